"""Hook implementation of the Horovod plugin. Cheap to import: Horovod itself is imported only when launching."""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import LauncherInfo


@hookimpl
def deepgalaxy_launchers() -> list[LauncherInfo]:
    return [
        LauncherInfo(
            "horovod",
            loader="deepgalaxy.plugins.horovod.launcher:HorovodLauncher",
            requires=("horovod",),
            description="N data-parallel ranks with horovodrun --gloo (one machine or --hosts h1:4,h2:4)",
        )
    ]
