"""The record of an output being written in units, so that an interrupted run continues where it stopped.

A catalogue-scale command (``predict``, ``latent index``) writes its output unit by unit and, after each, the
record ``progress.json`` in its partial folder (``OUT.csv.partial/``, ``INDEX/partial/``): what the output is made
from (its *identity*: model version and weights, precision, inputs and their fingerprints, options, columns), how
many units are written, and how long the output was then. A run asked to resume checks the identity against its
own and refuses, naming what differs, so the results of two models or two inputs are never mixed in one file; the
output is cut back to the recorded length (a unit written after the last record is written again).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgalaxy.core.errors import DeepGalaxyError

FORMAT = "deepgalaxy-partial-output"
PROGRESS_FILE = "progress.json"


class ResumeError(DeepGalaxyError):
    """A partial output that cannot be continued by this run (made from something else, or not there)."""


@dataclass
class Progress:
    """Where a partial output stands: units written, the output's length then, and what the command keeps (e.g.
    the files skipped so far)."""

    folder: Path
    identity: dict[str, Any]
    units: int = 0
    length: int = 0
    kept: dict[str, Any] = field(default_factory=dict)

    def commit(self, units: int, length: int) -> None:
        """Record ``units`` written and the output's ``length`` (atomically: a kill leaves the old or the new)."""
        self.units, self.length = units, length
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{PROGRESS_FILE}.part"
        tmp.write_text(json.dumps({"format": FORMAT, "identity": self.identity, "units": units, "length": length,
                                   "kept": self.kept}))
        os.replace(tmp, self.folder / PROGRESS_FILE)

    def finish(self) -> None:
        """The output is complete: remove the partial folder."""
        shutil.rmtree(self.folder, ignore_errors=True)


def is_partial(folder: Path) -> bool:
    """Whether ``folder`` is the partial folder of a deepgalaxy output (holds a progress record of ours)."""
    return read_record(folder) is not None


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two identities, one ``key: THEN then, NOW now`` per key."""
    return [f"{key}: {_short(then.get(key))} then, {_short(now.get(key))} now"
            for key in sorted(set(then) | set(now)) if then.get(key) != now.get(key)]


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def resume(folder: Path, identity: dict[str, Any], output: str, restart: str) -> Progress:
    """The progress of the partial output whose record is in ``folder``, checked to be made from ``identity``;
    ``output`` names the output in errors, ``restart`` says how to start it again. Raises :class:`ResumeError`
    naming what differs."""
    record = read_record(folder)
    if record is None:
        raise ResumeError(f"{output}: no interrupted run to resume ({folder / PROGRESS_FILE} is missing); run without "
                          "--resume")
    diff = differences(record.get("identity", {}), identity)
    if diff:
        raise ResumeError(f"{output} was partly made from something else, so this run does not continue it: "
                          f"{'; '.join(diff)}. Run it as before to resume it, or {restart}")
    return Progress(folder, identity, int(record.get("units", 0)), int(record.get("length", 0)),
                    dict(record.get("kept", {})))


__all__ = ["FORMAT", "PROGRESS_FILE", "Progress", "ResumeError", "differences", "is_partial", "read_record", "resume"]
