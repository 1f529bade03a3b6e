"""TensorFlow / Keras 3 framework plugin: the same backbones, parts, shapes and card names as the torch plugin.

Importing this package does not import tensorflow; :mod:`.plugin` holds the hooks, :mod:`.framework` the
:class:`~deepgalaxy.core.interfaces.Framework` implementation (imports tensorflow and keras).
"""
