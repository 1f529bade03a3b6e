"""Figures of the latent space, drawn with matplotlib's Agg backend (files only, no display needed).

- :func:`search_figure`: like the paper's Fig. 6, one row per query: the query on the left, then its
  recommendations sorted by similarity, each titled with its SSIM to the query, class and latent distance.
- :func:`interpolation_figure`: like Fig. 5, images decoded along the line from z(A) to z(B), the originals A and
  B at either end; :func:`grid_figure`: the 2-D grid over two latent directions.
- :func:`spectrum_figure`: the smallest eigenvalues of the kNN graph's normalised Laplacian (MLflow artifact).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from deepgalaxy.runs.latent import Interpolation, SearchResult

PANEL_IN = 1.85
"""Inches per image panel: 64-128 px images stay sharp at the 120 dpi the figures are saved with."""
CMAP = "gray"
QUERY_COLOUR = "#d62728"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _show(ax: Any, image: np.ndarray) -> None:
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else np.clip(img.astype(np.float32), 0.0, 1.0)
    if img.ndim == 3 and img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(img[..., :3], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax: Any, colour: str, width: float = 3.0) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _describe(meta: dict[str, Any]) -> tuple[str, str]:
    """('class 34', 'q 0.50 · cam 3') from a metadata record (missing or unknown values left out)."""
    label = meta.get("label")
    cls = f"class {int(label)}" if label is not None and int(label) >= 0 else ""
    parts: list[str] = []
    q = meta.get("mass_ratio")
    if q is not None and np.isfinite(q):
        parts.append(f"q {float(q):.2f}")
    cam = meta.get("camera")
    if cam is not None and int(cam) >= 0:
        parts.append(f"cam {int(cam)}")
    return cls, " · ".join(parts)


def search_figure(result: SearchResult, path: str | Path, title: str | None = None) -> Path:
    """Queries down the left, recommendations across in order of latent distance, SSIM and class in each title."""
    plt = _pyplot()
    queries = result.queries
    cols = 1 + max((len(q.neighbours) for q in queries), default=0)
    fig, axes = plt.subplots(len(queries), cols, figsize=(PANEL_IN * cols, PANEL_IN * 1.45 * len(queries) + 0.45),
                             squeeze=False)
    for r, q in enumerate(queries):
        ax = axes[r][0]
        _show(ax, q.image)
        _frame(ax, QUERY_COLOUR)
        cls, rest = _describe(q.meta)
        cluster = "" if q.cluster is None else f" · cluster {q.cluster}"
        ax.set_title(f"query: {q.name}\n{cls or 'image file'}{cluster}\n{rest}", fontsize=8.5, color=QUERY_COLOUR,
                     fontweight="bold")
        for c in range(1, cols):
            ax = axes[r][c]
            if c - 1 >= len(q.neighbours):
                ax.axis("off")
                continue
            nb = q.neighbours[c - 1]
            _show(ax, _image_of(nb))
            cls, rest = _describe(nb.meta)
            ax.set_title(f"#{c}  SSIM {nb.ssim:.2f}\n{cls} · d {nb.distance:.3g}\n{rest}", fontsize=8.5)
    method = {"cluster": "within the query's spectral cluster", "hnsw": "HNSW", "exact": "exact"}.get(result.method,
                                                                                                     result.method)
    fig.suptitle(title or f"Recommendations by latent distance ({result.model.name} v{result.model.version}, "
                 f"{method} search); SSIM to the query, class = merger time step", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=0.6, w_pad=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, facecolor="white")
    plt.close(fig)
    return out


def _image_of(nb: Any) -> np.ndarray:
    """A neighbour's image (the search attaches it)."""
    image = getattr(nb, "image", None)
    if image is None:
        raise ValueError(f"neighbour row {nb.row} has no image to draw; attach images before drawing")
    return np.asarray(image)


def interpolation_figure(interp: Interpolation, path: str | Path, title: str | None = None) -> Path:
    """Original A, the decoded line z(A) -> z(B) (t = 0 is A's reconstruction, t = 1 B's), original B."""
    plt = _pyplot()
    steps = len(interp.t)
    cols = steps + 2
    fig, axes = plt.subplots(1, cols, figsize=(PANEL_IN * 0.9 * cols, PANEL_IN * 0.9 * 1.3 + 0.4), squeeze=False)
    names = interp.names or ["A", "B"]
    _show(axes[0][0], interp.originals[0])
    _frame(axes[0][0], QUERY_COLOUR)
    axes[0][0].set_title(f"A (input)\n{names[0]}", fontsize=8, color=QUERY_COLOUR, fontweight="bold")
    for i in range(steps):
        ax = axes[0][i + 1]
        _show(ax, interp.images[i])
        label = "decoded z(A)" if i == 0 else "decoded z(B)" if i == steps - 1 else "decoded"
        ax.set_title(f"t = {interp.t[i]:.2f}\n{label}", fontsize=8)
    _show(axes[0][-1], interp.originals[1])
    _frame(axes[0][-1], QUERY_COLOUR)
    axes[0][-1].set_title(f"B (input)\n{names[1]}", fontsize=8, color=QUERY_COLOUR, fontweight="bold")
    fig.suptitle(title or "Latent interpolation: z = (1 - t) z(A) + t z(B), decoded through the VAE decoder and D",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93), w_pad=0.25)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, facecolor="white")
    plt.close(fig)
    return out


def grid_figure(interp: Interpolation, path: str | Path, title: str | None = None) -> Path:
    """The decoded 2-D grid: across from A to B, down along the second latent direction (labelled in sigma)."""
    if interp.grid is None:
        raise ValueError("no grid to draw: call latent_grid() first")
    plt = _pyplot()
    rows, cols = interp.grid.shape[:2]
    panel, gap, left, top = PANEL_IN * 0.8, 0.06, 0.55, 0.95  # inches; gap as a fraction of a panel
    width, height = left + cols * panel * (1 + gap) + 0.1, top + rows * panel * (1 + gap) + 0.1
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False,
                             gridspec_kw={"wspace": gap, "hspace": gap})
    fig.subplots_adjust(left=left / width, right=1 - 0.1 / width, bottom=0.1 / height, top=1 - top / height)
    offsets: Sequence[float] = interp.grid_axes.get("offsets_sigma", [0.0] * rows)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            _show(ax, interp.grid[r, c])
            if r == 0:
                ax.set_title(f"t = {interp.t[c]:.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{offsets[r]:+.1f} σ", fontsize=8)
            if abs(offsets[r]) < 1e-9:
                _frame(ax, QUERY_COLOUR, 1.5)
    names = interp.names or ["A", "B"]
    fig.suptitle(title or f"Decoded latent grid. Across: z(A) -> z(B), {names[0]} -> {names[1]}\n"
                 f"down: {interp.grid_axes.get('down', 'a second direction')}", fontsize=9.5,
                 y=1 - 0.12 / height, va="top")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, facecolor="white")
    plt.close(fig)
    return out


def spectrum_figure(eigenvalues: np.ndarray, n_clusters: int, path: str | Path, title: str = "") -> Path:
    """Smallest eigenvalues of the normalised Laplacian, the chosen number of clusters marked."""
    plt = _pyplot()
    ev = np.asarray(eigenvalues, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(np.arange(1, len(ev) + 1), ev, marker="o", ms=3)
    if 0 < n_clusters < len(ev):
        ax.axvline(n_clusters + 0.5, color=QUERY_COLOUR, ls="--", label=f"{n_clusters} clusters")
        ax.legend()
    ax.set(xlabel="index (ascending)", ylabel="eigenvalue", title=title or "normalised Laplacian spectrum")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
