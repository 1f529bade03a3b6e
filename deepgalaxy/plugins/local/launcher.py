"""The local launcher: runs one worker process on this machine; its collective is the one-rank identity."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from deepgalaxy.core.collective import LocalCollective
from deepgalaxy.core.interfaces import Collective, FrameworkInfo
from deepgalaxy.core.lifetime import tied_to_parent


class LocalLauncher:
    """Runs the worker command as a single process (rank 0 of 1) that is killed when this process dies."""

    name = "local"

    def launch(self, argv: Sequence[str], workers: int, hosts: str | None, env: Mapping[str, str]) -> int:
        if workers != 1 or hosts:
            raise ValueError(
                f"the local launcher runs exactly one worker on this machine (asked: workers={workers}, "
                f"hosts={hosts!r}); use --launcher horovod for more"
            )
        return subprocess.call(tied_to_parent(list(argv)), env={**os.environ, **env})

    def ranks_per_machine(self, workers: int, hosts: str | None) -> int:
        return 1

    def collective(self, framework: FrameworkInfo) -> Collective:
        return LocalCollective()
