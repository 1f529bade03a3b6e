"""deepgalaxy: learn the physics of colliding galaxies from images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepgalaxy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
