"""Hook implementation of the built-in local launcher plugin."""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import LauncherInfo


@hookimpl
def deepgalaxy_launchers() -> list[LauncherInfo]:
    return [LauncherInfo("local", "deepgalaxy.plugins.local.launcher:LocalLauncher",
                         description="one process on this machine")]
