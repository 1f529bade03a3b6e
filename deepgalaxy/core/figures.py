"""Every figure deepgalaxy draws, in one style: matplotlib's object API on the Agg canvas (files only, no display,
no pyplot state), white background, saved at :data:`DPI`.

- training (MLflow artifacts of every run): :func:`plot_curves` (loss and accuracy per epoch, the paper's Figs.
  3-4), :func:`plot_confusion`, :func:`plot_reconstructions`;
- the latent space: :func:`search_figure` (like the paper's Fig. 6, one row per query: the query on the left,
  then its recommendations sorted by similarity, each titled with its SSIM to the query, class and latent
  distance), :func:`interpolation_figure` (like Fig. 5, images decoded along the line from z(A) to z(B)),
  :func:`grid_figure` (the 2-D grid over two latent directions), :func:`spectrum_figure` (the smallest
  eigenvalues of the kNN graph's normalised Laplacian);
- observations: :func:`preprocess_figure` (images as read and preprocessed), :func:`prediction_sheet` (what
  ``deepgalaxy predict --sheet`` draws);
- scaling (Fig. 7): :func:`plot_scaling`, :func:`scaling_figure`; tuning: :func:`plot_importances`;
- images side by side, each with its caption: :func:`panels_figure` (the observing effects' gallery);
- the web page of ``deepgalaxy serve``: :func:`probability_svg` (the class probabilities as an inline SVG, written
  directly rather than through matplotlib: it is drawn for every request, in well under a millisecond).

The latent figures take their inputs structurally (:class:`SearchDrawing`, :class:`InterpolationDrawing`), so this
module imports nothing above core.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deepgalaxy.core.scaling import ScalingError, ScalingRow

DPI = 120
PANEL_IN = 1.85
"""Inches per image panel: 64-128 px images stay sharp at the :data:`DPI` the figures are saved with."""
CMAP = "gray"
QUERY_COLOUR = "#d62728"


# The drawings' inputs, as read-only protocols: any object with these attributes fits (runs.latent's results).
class _Neighbour(Protocol):
    @property
    def row(self) -> int: ...
    @property
    def distance(self) -> float: ...
    @property
    def ssim(self) -> float: ...
    @property
    def meta(self) -> dict[str, Any]: ...


class _Query(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def image(self) -> np.ndarray: ...
    @property
    def meta(self) -> dict[str, Any]: ...
    @property
    def cluster(self) -> int | None: ...
    @property
    def neighbours(self) -> Sequence[_Neighbour]: ...


class _ModelRef(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...


class SearchDrawing(Protocol):
    """What :func:`search_figure` draws: queries with their neighbours (images attached), the model, the method."""

    @property
    def queries(self) -> Sequence[_Query]: ...
    @property
    def method(self) -> str: ...
    @property
    def model(self) -> _ModelRef: ...


class InterpolationDrawing(Protocol):
    """What :func:`interpolation_figure` and :func:`grid_figure` draw: decoded images along ``t``, the originals."""

    @property
    def t(self) -> np.ndarray: ...
    @property
    def images(self) -> np.ndarray: ...
    @property
    def originals(self) -> np.ndarray: ...
    @property
    def names(self) -> list[str] | None: ...
    @property
    def grid(self) -> np.ndarray | None: ...
    @property
    def grid_axes(self) -> dict[str, Any]: ...


def _figure(**options: Any) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: nothing global changes, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**options)
    FigureCanvasAgg(fig)
    return fig


def _subplots(rows: int, cols: int, figsize: tuple[float, float], **options: Any) -> tuple[Any, Any]:
    """A figure and its ``rows`` x ``cols`` axes, always indexed ``axes[row][col]``."""
    fig = _figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False, **options)


SOFTWARE = "deepgalaxy"
"""The PNG ``Software`` text of every figure: how ``--overwrite`` knows a PNG is one deepgalaxy drew."""


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` (its folder created) in the house style; return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.suffix.lower() == ".png"
    fig.savefig(out, dpi=DPI, facecolor="white", **({"metadata": {"Software": SOFTWARE}} if png else {}))
    return out


def drawn_here(path: str | Path) -> bool:
    """Whether the PNG at ``path`` was written by :func:`_save` (its ``Software`` text is :data:`SOFTWARE`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(im.info.get("Software", "")) == SOFTWARE
    except OSError:
        return False


# --- training -------------------------------------------------------------------------------------------------


def plot_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training and validation loss (left) and accuracy (right) against epoch."""
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history) + 1)
    has_acc = any("val/accuracy" in h for h in history)
    fig, axes = _subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 4))
    ax = axes[0][0]
    for key, label in (("train/loss", "training"), ("val/loss", "validation")):
        ys = [h.get(key, np.nan) for h in history]
        ax.plot(epochs, ys, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        for key, label in (("train/accuracy", "training"), ("val/accuracy", "validation"),
                           ("val/within_k_accuracy", "validation, within k")):
            ys = [h.get(key, np.nan) for h in history]
            ax.plot(epochs, ys, marker="o", label=label)
        ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusion: np.ndarray, path: Path) -> Path:
    """Row-normalised confusion matrix (true class down, predicted class across)."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, axes = _subplots(1, 1, figsize=(6, 5))
    ax = axes[0][0]
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xlabel="predicted class", ylabel="true class", title="validation confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path) -> Path:
    """Validation images (top row) and their reconstructions (bottom row)."""
    n = min(len(originals), 8)
    fig, axes = _subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        for row, images in enumerate((originals, reconstructions)):
            img = np.clip(np.asarray(images[i], dtype=np.float32), 0, 1)
            ax = axes[row][i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray" if img.shape[-1] == 1 else None)
            ax.axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def panels_figure(panels: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = "",
                  cols: int = 5) -> Path:
    """Images (uint8, or floats in 0..1) in rows of ``cols``, each captioned (captions may span lines)."""
    rows = max(1, -(-len(panels) // cols))
    lines = max((caption.count("\n") + 1 for caption, _ in panels), default=1)
    fig, axes = _subplots(rows, cols, figsize=(PANEL_IN * cols, (PANEL_IN + 0.15 * lines) * rows + 0.3))
    for k, ax in enumerate(ax for row in axes for ax in row):
        if k >= len(panels):
            ax.axis("off")
            continue
        caption, image = panels[k]
        _show(ax, image if image.ndim == 3 else image[..., None])
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --- the latent space ----------------------------------------------------------------------------------------


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


def search_figure(result: SearchDrawing, path: str | Path, title: str | None = None) -> Path:
    """Queries down the left, recommendations across in order of latent distance, SSIM and class in each title."""
    queries = result.queries
    cols = 1 + max((len(q.neighbours) for q in queries), default=0)
    fig, axes = _subplots(len(queries), cols, figsize=(PANEL_IN * cols, PANEL_IN * 1.45 * len(queries) + 0.45))
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
    return _save(fig, path)


def _image_of(nb: Any) -> np.ndarray:
    """A neighbour's image (the search attaches it)."""
    image = getattr(nb, "image", None)
    if image is None:
        raise ValueError(f"neighbour row {nb.row} has no image to draw; attach images before drawing")
    return np.asarray(image)


def interpolation_figure(interp: InterpolationDrawing, path: str | Path, title: str | None = None) -> Path:
    """Original A, the decoded line z(A) -> z(B) (t = 0 is A's reconstruction, t = 1 B's), original B."""
    steps = len(interp.t)
    cols = steps + 2
    fig, axes = _subplots(1, cols, figsize=(PANEL_IN * 0.9 * cols, PANEL_IN * 0.9 * 1.3 + 0.4))
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
    return _save(fig, path)


def grid_figure(interp: InterpolationDrawing, path: str | Path, title: str | None = None) -> Path:
    """The decoded 2-D grid: across from A to B, down along the second latent direction (labelled in sigma)."""
    if interp.grid is None:
        raise ValueError("no grid to draw: call latent_grid() first")
    rows, cols = interp.grid.shape[:2]
    panel, gap, left, top = PANEL_IN * 0.8, 0.06, 0.55, 0.95  # inches; gap as a fraction of a panel
    width, height = left + cols * panel * (1 + gap) + 0.1, top + rows * panel * (1 + gap) + 0.1
    fig, axes = _subplots(rows, cols, figsize=(width, height), gridspec_kw={"wspace": gap, "hspace": gap})
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
    return _save(fig, path)


def spectrum_figure(eigenvalues: np.ndarray, n_clusters: int, path: str | Path, title: str = "") -> Path:
    """Smallest eigenvalues of the normalised Laplacian, the chosen number of clusters marked."""
    ev = np.asarray(eigenvalues, dtype=np.float64)
    fig, axes = _subplots(1, 1, figsize=(6, 3.6))
    ax = axes[0][0]
    ax.plot(np.arange(1, len(ev) + 1), ev, marker="o", ms=3)
    if 0 < n_clusters < len(ev):
        ax.axvline(n_clusters + 0.5, color=QUERY_COLOUR, ls="--", label=f"{n_clusters} clusters")
        ax.legend()
    ax.set(xlabel="index (ascending)", ylabel="eigenvalue", title=title or "normalised Laplacian spectrum")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return _save(fig, path)


# --- observations -------------------------------------------------------------------------------------------------


def _display(raw: np.ndarray) -> np.ndarray:
    """An image as read (any range, linear or not) scaled for display: 0.5-99.5 percentile of its luminance."""
    img = np.asarray(raw, dtype=np.float64)
    lum = img if img.ndim == 2 else img[..., :3].mean(axis=-1)
    lo, hi = np.percentile(lum, [0.5, 99.5])
    out: np.ndarray = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return out[..., None] if out.ndim == 2 else out


def preprocess_figure(befores: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int]],
                      afters: Sequence[np.ndarray], names: Sequence[str], path: str | Path,
                      title: str | None = None) -> Path:
    """One column per image: as read (top, the crop drawn in red; display-scaled) and preprocessed (bottom)."""
    from matplotlib.patches import Rectangle

    n = len(befores)
    fig = _figure(figsize=(PANEL_IN * 1.2 * n, PANEL_IN * 1.2 * 2 + 0.9), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        ax = axes[0][i]
        _show(ax, _display(befores[i]))
        top, left, side = boxes[i]
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor=QUERY_COLOUR, lw=1.5))
        h, w = np.asarray(befores[i]).shape[:2]
        ax.set_xlim(min(-0.5, left - 0.5), max(w - 0.5, left + side - 0.5))
        ax.set_ylim(max(h - 0.5, top + side - 0.5), min(-0.5, top - 0.5))
        ax.set_title(f"{names[i]}\nas read, {w}x{h}", fontsize=8)
        _show(axes[1][i], afters[i])
        size = np.asarray(afters[i]).shape[0]
        axes[1][i].set_title(f"preprocessed, {size}x{size}", fontsize=8)
    fig.suptitle(title or "Observation preprocessing: sky subtracted, centred and cropped on the system (red), "
                 "the simulator's asinh stretch", fontsize=9)
    return _save(fig, path)


def prediction_sheet(images: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike[str], title: str = "",
                     columns: int = 6) -> Path:
    """A grid of the images a model saw, each titled with its prediction (a few short lines)."""
    n = len(images)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig = _figure(figsize=(PANEL_IN * 1.15 * cols, (PANEL_IN * 1.15 + 0.17 * lines) * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n:
            ax.axis("off")
            continue
        _show(ax, images[i])
        ax.set_title(titles[i], fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --- scaling and tuning ---------------------------------------------------------------------------------------


def plot_scaling(
    measured: Sequence[ScalingRow],
    projected: Sequence[ScalingRow] = (),
    path: str | Path | None = None,
    title: str = "Data-parallel scaling",
    projection_label: str = "projection (ring-allreduce model)",
) -> Any:
    """A Fig.-7-style figure: speed-up vs workers with the ideal line, throughput on a second axis, efficiency
    printed at every point. Projected rows are drawn dashed with hollow markers and labelled as a projection.

    Returns the Figure; writes it to ``path`` when given.
    """
    if not measured and not projected:
        raise ScalingError("nothing to plot: give measured and/or projected scaling rows")
    fig = _figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    all_rows = [*measured, *projected]
    n0 = min(r.workers for r in (measured or projected))
    xs = sorted({r.workers for r in all_rows} | {n0})
    ax.plot(xs, [x / n0 for x in xs], color="0.6", linestyle=":", label="ideal (linear)")
    speed_color, thr_color = "tab:blue", "tab:orange"
    for rows, is_proj in ((measured, False), (projected, True)):
        if not rows:
            continue
        w = [r.workers for r in rows]
        style: dict[str, Any] = {"linestyle": "--" if is_proj else "-", "markersize": 7}
        fill = "none" if is_proj else None
        tag = projection_label if is_proj else "measured"
        ax.plot(w, [r.speedup for r in rows], marker="s" if is_proj else "o", color=speed_color,
                markerfacecolor=fill or speed_color, label=f"speed-up, {tag}", **style)
        ax2.plot(w, [r.images_per_s for r in rows], marker="^", linestyle="none", color=thr_color,
                 markerfacecolor=fill or thr_color, markersize=5, label=f"throughput (right axis), {tag}")
        for r in rows:
            ax.annotate(f"{r.efficiency:.2f}", (r.workers, r.speedup), textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color=speed_color, fontstyle="italic" if is_proj else "normal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax2.set_yscale("log", base=2)
    # Throughput = speed-up x throughput at N0: align the axes so each point reads the same on both.
    base_rows = [r for r in (measured or projected) if r.workers == n0]
    low, high = ax.get_ylim()
    ax2.set_ylim(low * base_rows[0].images_per_s, high * base_rows[0].images_per_s)
    ax.set_xlabel("workers")
    ax.set_ylabel(f"speed-up (relative to {n0} worker{'s' if n0 > 1 else ''})", color=speed_color)
    ax2.set_ylabel("throughput (images / s)", color=thr_color)
    ax.grid(True, which="major", alpha=0.3)
    full_title = title + (" — measured and PROJECTION" if projected and measured else
                          " — PROJECTION" if projected else " — measured")
    ax.set_title(full_title + "\n(numbers at the points: efficiency)", fontsize=10)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, loc="upper left")
    if path is not None:
        _save(fig, path)
    return fig


def scaling_figure(measured: Sequence[ScalingRow], projected: Sequence[ScalingRow], path: str | Path, title: str,
         projection_label: str = "PROJECTION") -> Path:
    """:func:`plot_scaling` made easier to read (plain-number ticks, legend where the diagonal leaves room), saved."""
    from matplotlib.ticker import FuncFormatter

    fig = plot_scaling(measured, projected, None, title=title, projection_label=projection_label)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in fig.axes:
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
    low, high = fig.axes[0].get_xlim()
    fig.axes[0].set_xlim(low, high * 1.35)  # room for the efficiency printed right of the last point
    legend = fig.axes[0].get_legend()
    if legend is not None:
        legend.set_loc("lower right")
        legend.set_zorder(10)
    return _save(fig, path)


BAR_COLOUR = "#1f77b4"
"""Matplotlib's first colour: the bars of :func:`probability_svg`."""


def probability_svg(probabilities: Sequence[float] | np.ndarray, width: int = 640, height: int = 200) -> str:
    """An SVG bar chart of class probabilities (class on x, probability on y; the most likely class in
    :data:`QUERY_COLOUR`), with a hover title per bar: what the ``serve`` page shows for every upload."""
    p = np.asarray(probabilities, dtype=np.float64)
    left, bottom, top, right = 40, 28, 10, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    top_p = float(p.max()) if len(p) and p.max() > 0 else 1.0
    y_max = min(1.0, np.ceil(top_p * 10) / 10) or 1.0
    step = plot_w / max(len(p), 1)
    best = int(p.argmax()) if len(p) else -1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10" role="img">',
             '<rect width="100%" height="100%" fill="white"/>']
    for i, value in enumerate(p):
        h = plot_h * min(float(value), y_max) / y_max
        colour = QUERY_COLOUR if i == best else BAR_COLOUR
        parts.append(f'<rect class="bar" x="{left + i * step + 0.5:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(step - 1, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                     f"<title>class {i}: {value:.3f}</title></rect>")
    axis_y = top + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="black"/>')
    for c in range(0, len(p), 10):
        x = left + (c + 0.5) * step
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 12}" text-anchor="middle">{c}</text>')
    for frac in (0.0, 0.5, 1.0):
        y = axis_y - plot_h * frac
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{y_max * frac:.2g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle">class</text>')
    parts.append(f'<text x="10" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 10 {top + plot_h / 2:.1f})">probability</text>')
    parts.append("</svg>")
    return "".join(parts)


def plot_importances(values: Mapping[str, float], path: str | Path, title: str, metric: str) -> Path:
    """Horizontal bars of an Optuna study's parameter importances for ``metric``."""
    names = list(values)[::-1]
    fig = _figure(figsize=(6.0, 1.2 + 0.45 * max(1, len(names))), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel(f"importance for {metric} (fANOVA, normalised)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
