"""Where a command may write a store, and what ``--overwrite`` may replace.

The rule, for every writer of stores: ``--overwrite`` replaces only a deepgalaxy store (a folder whose root
``zarr.json`` carries the store attributes with format ``deepgalaxy-dataset``, and nothing else at its top level)
or an empty folder. It never replaces a file or any other folder, and a store is never written onto, inside, or
around a folder the same command reads. Refusals name the path, say why, and suggest a path that works; nothing is
deleted before every check has passed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.schema import ATTRS_KEY, FORMAT, STORE_ENTRIES

OutputState = Literal["new", "store"]
"""``new``: nothing there, or an empty folder (create a store); ``store``: a deepgalaxy store is there."""

RULE = "--overwrite only replaces deepgalaxy stores and empty folders"


def stored_attrs(path: Path | StoreLocation) -> dict[str, Any] | None:
    """The deepgalaxy attributes of the store at ``path`` (a folder or a URL), or None when ``path`` is not a
    deepgalaxy store.

    Reads the root ``zarr.json`` only (no chunk): cheap enough to ask before any write.
    """
    try:
        raw = StoreLocation.of(path).read_bytes("zarr.json")
        meta = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes", {}).get(ATTRS_KEY) if isinstance(meta, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        return None
    return attrs


def free_path(path: Path) -> Path:
    """A path beside ``path`` that does not exist yet, for advice: ``work`` -> ``work.zarr``, ``s.zarr`` ->
    ``s-2.zarr``, ``s-3.zarr``..."""
    if path.name in ("", ".", ".."):  # "." or "/": name the store after the folder, inside its parent
        path = path.resolve() if path.resolve().name else path.resolve() / "deepgalaxy"
    stem = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    names = ([] if path.name.endswith(".zarr") else [f"{stem}.zarr"]) + [f"{stem}-{k}.zarr" for k in range(2, 1000)]
    return next((path.with_name(n) for n in names if not path.with_name(n).exists()), path.with_name(f"{stem}.new"))


def _listing(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def why_not_replaceable(path: Path) -> str | None:
    """Why ``--overwrite`` must not delete ``path`` (None when it may: an empty folder or a store holding only
    the store's own entries)."""
    if path.is_symlink():
        return f"a symbolic link (to {path.resolve()}); {RULE}, given by their own path"
    if not path.exists() or _is_empty_folder(path):
        return None
    if not path.is_dir():
        return f"a file, not a deepgalaxy store; {RULE}"
    entries = [p.name for p in path.iterdir()]
    if stored_attrs(path) is None:
        return f"a folder holding {_listing(entries)}, not a deepgalaxy store; {RULE}"
    foreign = [n for n in entries if n not in STORE_ENTRIES]
    if foreign:
        return (
            f"a deepgalaxy store that also holds {_listing(foreign)}, which is not part of the store; {RULE} "
            "holding nothing else (move those out first)"
        )
    return None


def _input_relation(out: Path, inputs: Sequence[Path]) -> tuple[str, Path] | None:
    """How ``out`` overlaps an input of the command, and the outermost of the two (None when it does not)."""
    o = out.resolve()
    for given in inputs:
        i = Path(given).expanduser().resolve()
        if o == i:
            return f"is the input folder {given} of this command", Path(given)
        if o.is_relative_to(i):
            return f"lies inside the input folder {given} of this command", Path(given)
        if i.is_relative_to(o):
            return f"contains the input folder {given} of this command", out
    return None


def overwrite_advice(out: Path) -> str:
    """What to do about an existing store the command will not resume: --overwrite where it works, else a new
    path (saying why --overwrite will not do)."""
    why = why_not_replaceable(out)
    if why is None:
        return f"pass --overwrite to replace it, or choose another path, e.g. `{free_path(out)}`"
    return f"choose another path, e.g. `{free_path(out)}` ({why})"


def check_output(out: Path, *, overwrite: bool, inputs: Sequence[Path] = ()) -> OutputState:
    """Check ``out`` before a command writes a store there; raise :class:`DatasetError` when it must not.

    Never deletes anything (see :func:`replace_store`). Refused always: ``out`` equal to, inside, or around one
    of the command's ``inputs``; a file; a folder that is neither empty nor a deepgalaxy store. With
    ``overwrite``, also a store that holds other files or is a symbolic link.
    """
    relation = _input_relation(out, inputs)
    if relation is not None:
        text, outer = relation
        raise DatasetError(
            f"{out}: {text}; a store is never written onto, inside or around what the command reads (nothing "
            f"was deleted); choose another path, e.g. `{free_path(outer)}`"
        )
    if not out.exists() and not out.is_symlink():
        return "new"
    if _is_empty_folder(out):
        return "new"
    if stored_attrs(out) is not None:
        if overwrite and (why := why_not_replaceable(out)) is not None:
            raise DatasetError(f"{out}: {why}; nothing was deleted: choose another path, e.g. `{free_path(out)}`")
        return "store"
    why = why_not_replaceable(out)
    raise DatasetError(f"{out}: exists and is {why}; nothing was written: choose another path, e.g. `{free_path(out)}`")


def replace_store(out: Path) -> None:
    """Delete the store at ``out`` for ``--overwrite`` (checked again here: only a store holding nothing else)."""
    if stored_attrs(out) is None or (why := why_not_replaceable(out)) is not None:
        raise DatasetError(f"{out}: not replaced: {why or 'not a deepgalaxy store'}")
    shutil.rmtree(out)


def require_new(path: Path) -> None:
    """Refuse to create a store over anything but nothing or an empty folder (zarr's mode "w" would delete it)."""
    if path.exists() and not _is_empty_folder(path):
        raise DatasetError(
            f"{path}: a store is only created at a new path or in an empty folder (zarr would delete what is "
            "there); check it with deepgalaxy.core.overwrite.check_output and replace a store with replace_store"
        )


def new_store_advice(path: Path) -> str:
    """How to create a store for a path that is not one: at that path when it is free, beside it otherwise."""
    target = path if not path.exists() or _is_empty_folder(path) else free_path(path)
    return f"create one with `deepgalaxy data simulate {target}` or `deepgalaxy data ingest DIR {target}`"
