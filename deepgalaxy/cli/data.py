"""``deepgalaxy data``: simulate, ingest, inspect and look at Zarr datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from deepgalaxy.cli.common import console, resumable
from deepgalaxy.core.location import local_output

app = typer.Typer(help="Datasets: simulate mergers, ingest real images, inspect and look at stores.",
                  no_args_is_help=True)


def _floats(text: str | None, option: str, example: str) -> tuple[float, ...] | None:
    """'0.25,1/3,0.5' -> (0.25, 0.333.., 0.5); None (not given) stays None."""
    from fractions import Fraction

    from deepgalaxy.core.errors import DatasetError

    if text is None:
        return None
    try:
        return tuple(float(Fraction(t.strip())) for t in text.split(",") if t.strip())
    except (ValueError, ZeroDivisionError) as exc:
        raise DatasetError(f"{option}: cannot read numbers from {text!r} (use e.g. '{example}')") from exc


def _source(name: str) -> Any:
    from deepgalaxy.core.interfaces import resolve
    from deepgalaxy.core.plugins import get_plugin_manager

    return resolve(get_plugin_manager().dataset_sources.get(name).loader)()


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave (None = not given: an existing store's own value, else the default)."""
    return {k: v for k, v in options.items() if v is not None}


@app.command("simulate")
def simulate(
    out: str = typer.Argument(
        ..., help="store to write; an existing one is resumed and repaired with its own parameters"
    ),
    sims: int | None = typer.Option(None, help="number of simulations (spread round-robin over the mass ratios)",
                                    show_default="36"),
    size: int | None = typer.Option(None, help="image side in pixels", show_default="128"),
    particles: int | None = typer.Option(None, help="stars per galaxy", show_default="10000"),
    mass_ratios: str | None = typer.Option(None, help="comma-separated secondary/primary mass ratios",
                                           show_default="1/4,1/3,1/2,1,3/2"),
    pericentre: str | None = typer.Option(None, help="pericentre range LOW,HIGH in the primary's scale radius",
                                          show_default="0.4,0.9"),
    cameras: int | None = typer.Option(None, help="camera positions (1-14: 6 axes, then 8 cube diagonals)",
                                       show_default="14"),
    snapshots: int | None = typer.Option(None, help="time steps per simulation (71 = the paper's classes; more give "
                                         "finer times, labelled by time into the 71 classes)", show_default="71"),
    halo_mass: float | None = typer.Option(None, help="the primary's halo mass M200 in solar masses: with "
                                           "--scale-radius, the physical units of the properties (no pixel changes)",
                                           show_default="1e12"),
    scale_radius: float | None = typer.Option(None, help="the primary's NFW scale radius in kpc (the length unit; the "
                                              "time unit is 42.17 Myr with the defaults)", show_default="20"),
    observe: bool | None = typer.Option(None, "--observe/--no-observe", help="observe like a survey image, with "
                                        "the options below (README: Observed simulations)", show_default="no-observe"),
    psf: str | None = typer.Option(None, help="with --observe: PSF profile, gaussian or moffat",
                                   show_default="gaussian"),
    psf_fwhm: float | None = typer.Option(None, help="with --observe: PSF full width at half maximum, pixels "
                                          "(0 = none)", show_default="3.53, sigma 1.5"),
    moffat_beta: float | None = typer.Option(None, help="with --psf moffat: the Moffat beta (> 1)",
                                             show_default="4.765"),
    sky_noise: float | None = typer.Option(None, help="with --observe: sky noise sigma per pixel, as a fraction of "
                                           "the merger's central surface brightness (1e-4 = 10 mag fainter)",
                                           show_default="1e-4"),
    peak_counts: float | None = typer.Option(None, help="with --observe: photons in a pixel at the central surface "
                                             "brightness, for Poisson shot noise (0 = none)", show_default="0"),
    stars: float | None = typer.Option(None, help="with --observe: mean number of foreground stars per image",
                                       show_default="8"),
    star_mags: str | None = typer.Option(None, help="with --observe: stars' magnitudes BRIGHT,FAINT relative to "
                                         "the merger's total light", show_default="0,9"),
    background_galaxies: float | None = typer.Option(None, help="with --observe: mean number of background "
                                                     "galaxies (Sersic) per image", show_default="0"),
    background_mags: str | None = typer.Option(None, help="with --observe: background galaxies' magnitudes "
                                               "BRIGHT,FAINT relative to the merger", show_default="2,7"),
    background_radius: str | None = typer.Option(None, help="with --observe: background galaxies' effective radii "
                                                 "LOW,HIGH in pixels", show_default="0.5,3"),
    shift: float | None = typer.Option(None, help="with --observe: the merger's centre moves up to this many "
                                       "pixels along each axis", show_default="0"),
    scale_jitter: float | None = typer.Option(None, help="with --observe: apparent size times a factor in "
                                              "[1/(1+J), 1+J], log-uniform (0-1)", show_default="0"),
    pa_jitter: float | None = typer.Option(None, help="with --observe: rotation up to this many degrees either way "
                                           "(180 = any)", show_default="0"),
    redshift: float | None = typer.Option(None, help="with --observe: dim the merger's surface brightness by "
                                          "(1+z)^4", show_default="0"),
    seed: int | None = typer.Option(None, help="random seed (the store is identical for a seed)", show_default="0"),
    workers: int = typer.Option(0, help="processes (0 = all cores)"),
    overwrite: bool = typer.Option(False, help="replace an existing deepgalaxy store (never any other folder or "
                                   "file) instead of resuming it"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Simulate galaxy mergers into OUT (a Zarr store), one simulation per process.

    On an existing store: resumes it and re-simulates damaged simulations, with the store's own parameters.
    """
    import time

    from deepgalaxy.core.errors import DatasetError

    peri = _floats(pericentre, "--pericentre", "0.4,0.9")
    if peri is not None and len(peri) != 2:
        raise DatasetError(f"--pericentre takes LOW,HIGH, got {pericentre!r}")
    params = _given(
        sims=sims, size=size, particles=particles, pericentre=peri,
        mass_ratios=_floats(mass_ratios, "--mass-ratios", "0.25,1/3,0.5,1,3/2"), cameras=cameras,
        snapshots=snapshots, halo_mass=halo_mass, scale_radius=scale_radius, observe=observe, seed=seed, psf=psf,
        psf_fwhm=psf_fwhm, moffat_beta=moffat_beta, sky_noise=sky_noise, peak_counts=peak_counts, stars=stars,
        star_mags=_floats(star_mags, "--star-mags", "0,9"), background_galaxies=background_galaxies,
        background_mags=_floats(background_mags, "--background-mags", "2,7"),
        background_radius=_floats(background_radius, "--background-radius", "0.5,3"), shift=shift,
        scale_jitter=scale_jitter, pa_jitter=pa_jitter, redshift=redshift,
    )
    written: list[int] = []

    def repairing(found: Any) -> None:
        console.print(f"{found.path}: {len(found.problems)} chunk(s) missing or corrupt; re-simulating the "
                      "damaged simulations:", highlight=False, soft_wrap=True)
        for problem in found.problems:
            console.print(f"  {problem}", highlight=False, soft_wrap=True)

    start = time.perf_counter()
    with resumable(f"simulating into {out}"):
        path = _source("simulation").create(
            local_output(out, "OUT"), progress=progress, workers=workers or None, overwrite=overwrite,
            on_written=written.append, on_repair=repairing, **params,
        )
    took = time.perf_counter() - start
    if written:
        console.print(f"wrote {len(written)} simulation(s) to {path} in {took:.1f} s; see "
                      f"`deepgalaxy data info {path}`", highlight=False, soft_wrap=True)
    else:
        console.print(f"nothing to do: {path} holds all its simulations (every chunk read and checked); see "
                      f"`deepgalaxy data info {path}`", highlight=False, soft_wrap=True)


@app.command("verify")
def verify(
    data: str = typer.Argument(..., help="a deepgalaxy store (a folder, or its http(s)://, s3:// or file:// URL)"),
    progress: bool = typer.Option(True, help="show a progress bar (on a terminal)"),
) -> None:
    """Read every chunk of every array and check that it is there and decodes (zstd, crc32c checksum).

    Lists each damaged chunk with its array, rows and simulations; exit code 2 when there is damage.
    """
    import sys

    from deepgalaxy.core.dataset import resume_advice, verify_store

    found = verify_store(data, progress=progress and sys.stderr.isatty())
    for problem in found.problems:
        console.print(f"  {problem}", highlight=False, soft_wrap=True)
    if found.problems:
        raise found.error()
    incomplete = "" if found.attrs.get("complete") else (
        f"; the store is incomplete (writing was interrupted): {resume_advice(found.path, found.attrs)}"
    )
    console.print(f"{found.path}: no damage: read and checked {found.chunks} chunks of {found.arrays} "
                  f"arrays{incomplete}", highlight=False, soft_wrap=True)


PREPROCESS = typer.Option(True, "--preprocess/--no-preprocess", help="subtract the sky, centre and crop on the "
                          "interacting system, apply the simulator's brightness stretch (off: the central square, "
                          "resized)")
MASK_STARS = typer.Option(False, "--mask-stars/--no-mask-stars", help="set small compact sources outside the "
                          "system (foreground stars) to the sky")
MAX_PIXELS = typer.Option(40_000_000, "--max-pixels", min=1, help="refuse images with more pixels (width x height) "
                          "than this, before decoding them (decompression bombs)")
HDU = typer.Option(None, "--hdu", help="FITS: the HDU to read, by index or EXTNAME", show_default="the first image HDU")


@app.command("ingest")
def ingest(
    directory: Path = typer.Argument(..., help="folder of PNG/JPEG (FITS with astropy) images, recursive"),
    out: str = typer.Argument(..., help="store to write (outside DIRECTORY)"),
    labels: Path = typer.Option(None, "--labels", help="CSV table: a 'file' column (path relative to DIRECTORY), a "
                                "'class' column (0-70, empty = unlabelled) and/or property columns (numbers)"),
    size: int = typer.Option(128, help="image side in pixels"),
    channels: int = typer.Option(1, help="1 = grayscale (luminance), 3 = RGB"),
    preprocess: bool = PREPROCESS, mask_stars: bool = MASK_STARS, max_pixels: int = MAX_PIXELS, hdu: str = HDU,
    figure: Path = typer.Option(None, "--figure", help="also draw the first images as read and preprocessed (PNG)"),
    overwrite: bool = typer.Option(False, help="replace an existing deepgalaxy store (never any other folder or "
                                   "file)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Turn a folder of real images into a store with the same schema: preprocessed like the simulator's images,
    unlabelled or labelled from a table."""
    from deepgalaxy.core.imagefile import find_images

    path = _source("ingest").create(
        local_output(out, "OUT"), progress=progress, directory=directory, size=size, channels=channels,
        overwrite=overwrite, labels=labels, preprocess=preprocess, mask_stars=mask_stars, max_pixels=max_pixels,
        hdu=hdu,
    )
    from deepgalaxy.core.dataset import open_dataset

    ds = open_dataset(path)
    skipped = ds.attrs.get("skipped", [])
    labelled = int((ds.labels >= 0).sum())
    console.print(f"wrote {len(ds)} images to {path} ({labelled} labelled); skipped {len(skipped)} unreadable "
                  "file(s)", highlight=False)
    for item in skipped[:20]:
        console.print(f"  skipped {item['file']}: {item['error']}", highlight=False)
    if len(skipped) > 20:
        console.print(f"  ... and {len(skipped) - 20} more (listed in the store attributes under 'skipped')")
    if figure is not None:
        from deepgalaxy.core.observation import PreprocessOptions, draw_preprocessing

        shown = draw_preprocessing(find_images(directory)[:6], figure, size, channels,
                                   PreprocessOptions(**ds.attrs["preprocess"]), max_pixels, hdu)
        console.print(f"figure: {shown}", highlight=False)


@app.command("info")
def info(
    data: str = typer.Argument(..., help="a deepgalaxy store (a folder, or its http(s)://, s3:// or file:// URL)"),
    split: str = typer.Option("simulation", help="split to report: simulation or random"),
    validation_fraction: float = typer.Option(0.2, help="validation fraction of the split"),
    seed: int = typer.Option(0, help="split seed"),
) -> None:
    """Counts per class, per mass ratio and per split."""
    from deepgalaxy.core.dataset import open_dataset
    from deepgalaxy.core.properties import PROPERTIES

    ds = open_dataset(data, allow_incomplete=True)
    a = ds.attrs
    console.print(
        f"[bold]{ds.path}[/bold]  {len(ds)} images {ds.image_shape[0]}x{ds.image_shape[1]}x{ds.image_shape[2]}, "
        f"source {a.get('source')}, schema v{a.get('schema_version')}, fingerprint {ds.fingerprint()}"
        + ("" if a.get("complete") else "  [yellow](incomplete: only finished simulations counted)[/yellow]"),
        highlight=False,
    )
    units, names = ds.store.units, ds.store.property_names
    if units is not None:
        console.print(f"units: M200 {units.halo_mass:.4g} Msun, r_s {units.scale_radius:.4g} kpc (time unit "
                      f"{units.time_myr:.2f} Myr, velocity unit {units.velocity_kms:.1f} km/s)", highlight=False)
    shown = ", ".join(f"{n} ({PROPERTIES[n]})" if PROPERTIES.get(n) else n for n in names)
    derived = " (derived from the simulation metadata)" if names and "properties" not in a else ""
    console.print(f"properties: {shown or 'none'}{derived}", highlight=False, soft_wrap=True)
    meta = ds.metadata
    by_ratio = Table(title="per mass ratio")
    for col in ("mass ratio", "simulations", "images"):
        by_ratio.add_column(col, justify="right")
    ratios = meta["mass_ratio"]
    for q in np.unique(ratios[~np.isnan(ratios)]):
        m = ratios == q
        by_ratio.add_row(f"{q:.3g}", str(len(np.unique(meta["sim_id"][m]))), str(int(m.sum())))
    if np.isnan(ratios).any():
        by_ratio.add_row("real (none)", "-", str(int(np.isnan(ratios).sum())))
    console.print(
        f"checksums not verified (info reads metadata and labels only): `deepgalaxy data verify {ds.path}` reads "
        "and checks every chunk", highlight=False, soft_wrap=True,
    )
    console.print(by_ratio)

    counts = ds.class_counts()
    unlabelled = int((ds.labels < 0).sum())
    classes = Table(title=f"per class ({int((counts > 0).sum())} of {ds.num_classes} classes present)")
    for _ in range(4):
        classes.add_column("class", justify="right")
        classes.add_column("images", justify="right")
    cells = [(str(k), str(int(c))) for k, c in enumerate(counts) if c]
    if unlabelled:
        cells.append(("-1 (unlabelled)", str(unlabelled)))
    for row in range(0, len(cells), 4):
        flat = [x for pair in cells[row : row + 4] for x in pair]
        classes.add_row(*flat, *[""] * (8 - len(flat)))
    console.print(classes)

    try:
        train, val = ds.split(split, validation_fraction, seed)  # type: ignore[arg-type]
        splits = Table(title=f"split {split!r}, validation fraction {validation_fraction}, seed {seed}")
        for col in ("part", "images", "simulations", "mass ratios"):
            splits.add_column(col, justify="right")
        for name, part in (("train", train), ("validation", val)):
            md = part.metadata
            sims = np.unique(md["sim_id"][md["sim_id"] >= 0])
            qs = ", ".join(f"{q:.3g}" for q in np.unique(md["mass_ratio"][~np.isnan(md["mass_ratio"])]))
            splits.add_row(name, str(len(part)), str(len(sims)), qs or "-")
        console.print(splits)
    except Exception as exc:  # an unsplittable store still gets its counts
        console.print(f"[yellow]split: {exc}[/yellow]", highlight=False)


@app.command("show")
def show(
    data: str = typer.Argument(..., help="a deepgalaxy store (a folder, or its http(s)://, s3:// or file:// URL)"),
    out: Path = typer.Option(Path("gallery.png"), "--out", help="PNG file to write"),
    sims: int = typer.Option(3, help="simulations to show (spread over mass ratios)"),
    cameras: int = typer.Option(2, help="cameras per simulation"),
    steps: str = typer.Option("0,10,17,25,35,45,55,70", help="classes (time steps) to show, comma-separated"),
) -> None:
    """A gallery like the paper's Fig. 1: simulations x cameras (rows) by time steps (columns)."""
    from deepgalaxy.core.dataset import open_dataset

    try:
        wanted = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        from deepgalaxy.core.errors import DeepGalaxyError

        raise DeepGalaxyError(f"--steps {steps!r}: give classes (time steps) as comma-separated whole numbers, "
                           "e.g. 0,10,35,70") from None
    ds = open_dataset(data)
    path = gallery(ds, out, sims=sims, cameras=cameras, classes=wanted)
    console.print(f"wrote {path}")


def gallery(ds: Any, out: Path, sims: int = 3, cameras: int = 2, classes: list[int] | None = None) -> Path:
    """Draw a grid of images (rows: simulation x camera, columns: classes) with the class in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = ds.metadata
    classes = classes or [0, 10, 17, 25, 35, 45, 55, 70]
    rows: list[tuple[str, np.ndarray]] = []  # (row title, local positions per column)
    sim_ids = np.unique(meta["sim_id"][meta["sim_id"] >= 0])
    if len(sim_ids):
        # spread the chosen simulations over mass ratios
        ratio_of = {int(s): float(meta["mass_ratio"][meta["sim_id"] == s][0]) for s in sim_ids}
        order = sorted(sim_ids.tolist(), key=lambda s: (ratio_of[s], s))
        chosen = [order[int(i)] for i in np.linspace(0, len(order) - 1, min(sims, len(order)))]
        for s in dict.fromkeys(chosen):
            present = set(np.unique(meta["camera"][meta["sim_id"] == s]).tolist())
            # cameras 4/5 look down on the orbital plane (the simulator's x-y plane): the most telling views first
            cams = [c for c in (4, 2, 6, 5, 3, 7, 0, 1, *range(8, 14)) if c in present][:cameras]
            for c in cams:
                sel = np.flatnonzero((meta["sim_id"] == s) & (meta["camera"] == c))
                labels = meta["label"][sel]
                cols = np.array([sel[np.argmin(np.abs(labels - k))] for k in classes])
                rows.append((f"sim {s}, q={ratio_of[s]:.2g}, cam {c}", cols))
    else:  # real images: just the first ones
        n = min(len(ds), sims * cameras * len(classes))
        for r in range(0, n, len(classes)):
            rows.append(("", np.arange(r, min(r + len(classes), n))))
    ncols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.75 * len(rows)), squeeze=False)
    for i, (title, idx) in enumerate(rows):
        images = ds.images(idx)
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(idx):
                ax.axis("off")
                continue
            img = images[j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            label = int(meta["label"][idx[j]])
            ax.set_title(f"class {label}" if label >= 0 else f"#{int(ds.indices[idx[j]])}", fontsize=8)
            if j == 0 and title:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle(f"{ds.path.name}: {len(ds)} images", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
