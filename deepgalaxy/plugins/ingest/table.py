"""The labels table of ``data ingest --labels``: which class (and which physical properties) each image file has.

A CSV file with a header row. Column ``file``: the image's path relative to the ingested folder, as the store
lists it (``sub/ngc4038.fits``). Column ``class``: the timescale class 0..70, empty for an unlabelled image.
Every other column is a property (a number per image, empty = unknown), stored as ``properties/NAME``. Either a
class column or at least one property column must be there. Every image of the folder needs exactly one row, and
every row must name an image of the folder: anything else is refused, naming the files.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from deepgalaxy.core.errors import DatasetError, first_few
from deepgalaxy.core.specs import NUM_CLASSES

FILE_COLUMN = "file"
CLASS_COLUMN = "class"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class LabelsTable:
    """Per file (relative posix path): its class (-1 = unlabelled) and property values (NaN = unknown)."""

    path: Path
    classes: dict[str, int]
    properties: dict[str, dict[str, float]] = field(default_factory=dict)
    """property name -> file -> value."""

    def labels_for(self, files: list[str]) -> np.ndarray:
        return np.array([self.classes.get(f, -1) for f in files], dtype=np.int16)

    def property_arrays(self, files: list[str]) -> dict[str, np.ndarray]:
        return {name: np.array([values[f] for f in files], dtype=np.float32)
                for name, values in self.properties.items()}


def _key(name: str) -> str:
    return str(PurePosixPath(name.strip().replace("\\", "/")))


def read_table(path: Path, files: list[str]) -> LabelsTable:
    """Read and check the table at ``path`` against the folder's image ``files`` (relative posix paths)."""
    path = Path(path).expanduser()
    where = f"labels table {path}"
    if not path.is_file():
        raise DatasetError(f"{where}: no such file; give a CSV file with a '{FILE_COLUMN}' and a "
                           f"'{CLASS_COLUMN}' column")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{where}: cannot read it as CSV ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DatasetError(f"{where}: empty; the first row names the columns ('{FILE_COLUMN}', '{CLASS_COLUMN}', ...)")
    header = [h.strip() for h in rows[0]]
    if FILE_COLUMN not in header:
        raise DatasetError(f"{where}: no '{FILE_COLUMN}' column (columns: {', '.join(header) or 'none'}); the "
                           f"first row names the columns, e.g. {FILE_COLUMN},{CLASS_COLUMN}")
    props = [h for h in header if h not in (FILE_COLUMN, CLASS_COLUMN)]
    if CLASS_COLUMN not in header and not props:
        raise DatasetError(f"{where}: neither a '{CLASS_COLUMN}' column nor a property column; add one")
    bad = [h for h in props if not _NAME.match(h)] + [h for h in set(header) if header.count(h) > 1]
    if bad:
        raise DatasetError(f"{where}: column names must be unique identifiers (letters, digits, _): "
                           f"{first_few(sorted(set(bad)))}")
    known = set(files)
    classes: dict[str, int] = {}
    properties: dict[str, dict[str, float]] = {p: {} for p in props}
    seen: dict[str, int] = {}
    duplicates, unknown = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DatasetError(f"{where}, line {line}: {len(row)} cells, but the header has {len(header)}")
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        name = _key(cells[FILE_COLUMN])
        if name in seen:
            duplicates.append(f"{name} (lines {seen[name]} and {line})")
            continue
        seen[name] = line
        if name not in known:
            unknown.append(name)
            continue
        classes[name] = _class(cells.get(CLASS_COLUMN, ""), where, line)
        for p in props:
            properties[p][name] = _number(cells[p], p, where, line)
    if duplicates:
        raise DatasetError(f"{where}: {len(duplicates)} file(s) listed twice: {first_few(duplicates)}; keep one row "
                           "per file")
    if unknown:
        raise DatasetError(f"{where}: {len(unknown)} file(s) not among the images of the folder: "
                           f"{first_few(unknown)}; name files by their path relative to the folder, as "
                           f"`{FILE_COLUMN}` (e.g. {first_few(sorted(known), 2)})")
    missing = sorted(known - set(seen))
    if missing:
        raise DatasetError(f"{where}: {len(missing)} image(s) of the folder have no row: {first_few(missing)}; add "
                           f"a row for each (an empty '{CLASS_COLUMN}' for an unlabelled one) or move them out")
    return LabelsTable(path, classes, properties)


def _class(text: str, where: str, line: int) -> int:
    if not text:
        return -1
    try:
        value = int(text)
    except ValueError:
        value = -2
    if not 0 <= value < NUM_CLASSES:
        raise DatasetError(f"{where}, line {line}: class {text!r} is not a whole number 0..{NUM_CLASSES - 1} (leave "
                           "it empty for an unlabelled image)")
    return value


def _number(text: str, column: str, where: str, line: int) -> float:
    if not text:
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}, line {line}: {column} {text!r} is not a number (leave it empty when "
                           "unknown)") from None


__all__ = ["CLASS_COLUMN", "FILE_COLUMN", "LabelsTable", "read_table"]
