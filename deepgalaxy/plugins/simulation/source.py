"""The simulation dataset source: run mergers on all cores and write each finished one to a Zarr store.

``simulate(out, sims=36, size=128, ...)`` is the Python API; ``deepgalaxy data simulate`` calls it. One simulation
per process; the parent is the only writer, and marks a simulation done (``sims/done``) only after its images,
labels and metadata are written, so an interrupted run resumes by running the same call again.
Deterministic for a seed: simulation i draws everything from ``SeedSequence(seed, spawn_key=(i,))``, whatever
the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.dataset import Verification, verify_store
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.overwrite import check_output, overwrite_advice, replace_store, stored_attrs
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.properties import PROPERTIES, PhysicalUnits, simulation_properties
from deepgalaxy.core.schema import (
    ATTRS_KEY,
    MAX_CHUNK_BYTES,
    PROPERTIES_GROUP,
    chunk_images_for,
    create_store,
    label_for_snapshot,
    store_attrs,
    writing,
)
from deepgalaxy.plugins.simulation.observe import OBSERVATION_PARAMS, Observation, option_name
from deepgalaxy.plugins.simulation.physics import MergerParams, simulate_merger
from deepgalaxy.plugins.simulation.render import camera_directions, render_simulation

GENERATOR = "deepgalaxy.simulation"
PHYSICS_VERSION = 2
"""Bump when the physics or rendering changes what a seed produces (2: physically named observations)."""
UNOBSERVED_SINCE: dict[Any, tuple[str, ...]] = {1: ("psf_sigma", "stars", "sky_noise")}
"""Earlier versions whose unobserved images this one reproduces exactly, with the parameters they stored that this
one no longer has: their unobserved stores resume and repair as they are."""
_UNITS = PhysicalUnits()
UNITS_SINCE: dict[str, float] = {"halo_mass": _UNITS.halo_mass, "scale_radius": _UNITS.scale_radius}
"""Parameters added with schema version 2 (they change no pixel): a store whose parameters lack them had these."""

PAPER_MASS_RATIOS = (0.25, 1 / 3, 0.5, 1.0, 1.5)


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulated store's content (the workers count does not)."""

    sims: int = 36
    mass_ratios: tuple[float, ...] = PAPER_MASS_RATIOS
    pericentre: tuple[float, float] = (0.4, 0.9)
    particles: int = 10_000
    size: int = 128
    cameras: int = 14
    snapshots: int = 71
    t_end: float = 40.0
    dt: float = 0.02
    friction: float = 0.8
    half_width: float = 6.0
    halo_mass: float = _UNITS.halo_mass
    scale_radius: float = _UNITS.scale_radius
    observe: bool = False
    observation: Observation = field(default_factory=Observation)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.sims < 1:
            problems.append(f"sims={self.sims} must be >= 1")
        if not self.mass_ratios or any(q <= 0 for q in self.mass_ratios):
            problems.append(f"mass_ratios={self.mass_ratios} must be positive")
        lo, hi = self.pericentre
        if not 0 < lo <= hi:
            problems.append(f"pericentre range {self.pericentre} must satisfy 0 < low <= high")
        if self.particles < 10:
            problems.append(f"particles={self.particles} must be >= 10")
        if self.size < 8:
            problems.append(f"size={self.size} must be >= 8")
        if not 1 <= self.cameras <= 14:
            problems.append(f"cameras={self.cameras} must be between 1 and 14")
        if self.snapshots < 2:
            problems.append(f"snapshots={self.snapshots} must be >= 2")
        if self.t_end <= 0 or self.dt <= 0:
            problems.append("t_end and dt must be positive")
        try:
            PhysicalUnits(self.halo_mass, self.scale_radius)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise DatasetError("invalid simulation parameters: " + "; ".join(problems))

    @property
    def images_per_sim(self) -> int:
        return self.cameras * self.snapshots

    @property
    def num_images(self) -> int:
        return self.sims * self.images_per_sim

    @property
    def units(self) -> PhysicalUnits:
        """The physical scale of the simulation's N-body units."""
        return PhysicalUnits(self.halo_mass, self.scale_radius)

    def params(self) -> dict[str, Any]:
        """JSON-able parameters (stored in the store's attributes, compared on resume); the observation's flat
        among them, and only when the simulation is observed."""
        d = {k: v for k, v in asdict(self).items() if k != "observation"}
        d["mass_ratios"] = [float(q) for q in self.mass_ratios]
        d["pericentre"] = [float(p) for p in self.pericentre]
        d["halo_mass"], d["scale_radius"] = float(self.halo_mass), float(self.scale_radius)
        return {**d, **(self.observation.params() if self.observe else {})}


def _sim_task(cfg: SimulationConfig, sim: int) -> dict[str, Any]:
    """Draw simulation ``sim``'s parameters from its own seed stream."""
    ss = np.random.SeedSequence(cfg.seed, spawn_key=(sim,))
    rng = np.random.default_rng(ss)
    return {
        "sim": sim,
        "mass_ratio": float(cfg.mass_ratios[sim % len(cfg.mass_ratios)]),
        "pericentre": float(rng.uniform(*cfg.pericentre)),
        "seed": int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1)),
        "config": cfg.params(),
    }


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Simulate and render one merger (runs in a worker process)."""
    cfg = task["config"]
    rng = np.random.default_rng(task["seed"])
    params = MergerParams(
        mass_ratio=task["mass_ratio"], pericentre=task["pericentre"], particles=cfg["particles"],
        snapshots=cfg["snapshots"], t_end=cfg["t_end"], dt=cfg["dt"], friction=cfg["friction"],
    )
    result = simulate_merger(params, rng)
    obs = Observation(**{k: cfg[k] for k in OBSERVATION_PARAMS}) if cfg["observe"] else None
    images = render_simulation(
        result.positions, result.centres, result.weights, cfg["size"], cfg["cameras"], cfg["half_width"],
        observation=obs, seed=task["seed"],
    )
    return {
        "sim": task["sim"],
        "images": np.ascontiguousarray(images.transpose(1, 0, 2, 3)),  # (cameras, snapshots, H, W)
        "times": result.times.astype(np.float32),
        "t_pericentre": result.t_pericentre,
        "t_coalescence": result.t_coalescence,
        "mass_ratio": task["mass_ratio"],
        "pericentre": task["pericentre"],
        "seed": task["seed"],
    }


def _run_pool(tasks: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield run_one(task)
        return
    # fork where available: spawn would re-run a user's script without a __main__ guard. The workers only run
    # numpy/scipy code already imported here (never zarr), so zarr's idle I/O thread in the parent is harmless.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(run_one, tasks)


def _init_worker() -> None:
    """One thread per worker; Ctrl-C is the parent's to handle (it stops the pool and says how to resume), so a
    worker ignores SIGINT instead of printing a KeyboardInterrupt traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def _fmt(value: Any) -> str:
    """A parameter value as a user would type it: 0.333333 rather than 0.3333333333333333, lists comma-joined."""
    if isinstance(value, list | tuple):
        return ",".join(_fmt(v) for v in value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _config(params: dict[str, Any]) -> SimulationConfig:
    """A configuration from flat parameters (the observation's among them, as stored)."""
    seen = {k: v for k, v in params.items() if k in OBSERVATION_PARAMS}
    rest = {k: v for k, v in params.items() if k not in OBSERVATION_PARAMS}
    if seen and not rest.get("observe"):
        raise DatasetError(f"{', '.join(seen)} ({', '.join(option_name(k) for k in seen)}): observing parameters "
                           "take effect only with --observe (observe=True): add it, or leave them out")
    try:
        return SimulationConfig(**rest, observation=Observation(**seen))
    except TypeError as exc:
        raise DatasetError(f"unknown simulation parameter: {exc}") from exc


def _resumed_config(out: Path, attrs: dict[str, Any], params: dict[str, Any]) -> SimulationConfig:
    """The configuration of the store at ``out``: its stored parameters, which the ``params`` given must match.

    Parameters not given are taken from the store, so ``simulate(out)`` (``deepgalaxy data simulate OUT``) resumes
    or repairs any simulated store (one of schema version 1 lacks :data:`UNITS_SINCE`: it had their defaults).
    """
    gen = attrs.get("generator") or {}
    stored = dict(gen.get("params") or {})
    version = gen.get("version")
    same = gen.get("name") == GENERATOR and (
        version == PHYSICS_VERSION or (version in UNOBSERVED_SINCE and stored.get("observe") is False)
    )
    if not same:
        what = f"{gen.get('name')} version {version}" + (" (observed)" if stored.get("observe") else "")
        raise DatasetError(
            f"{out}: a store written by {what}, not by this simulator ({GENERATOR} version {PHYSICS_VERSION}), "
            f"so it cannot be resumed; {overwrite_advice(out)}"
        )
    stored = {**UNITS_SINCE, **{k: v for k, v in stored.items() if k not in UNOBSERVED_SINCE.get(version, ())}}
    cfg = _config({**stored, **params})
    asked = cfg.params()
    differ = [k for k in asked if k in params and asked[k] != stored.get(k)]
    if differ:
        listing = "; ".join(f"{k}: stored {_fmt(stored.get(k))}, asked {_fmt(asked[k])}" for k in differ)
        raise DatasetError(
            f"{out}: exists with other simulation parameters ({listing}); to resume it, give the stored values "
            f"or none (`deepgalaxy data simulate {shlex.quote(str(out))}` takes the store's own); otherwise "
            f"{overwrite_advice(out)}"
        )
    if asked != stored:  # a store whose parameters this version does not know
        raise DatasetError(f"{out}: its stored parameters {stored} are not this simulator's; {overwrite_advice(out)}")
    return cfg


def _repair(out: Path, root: Any, progress: bool, on_repair: Callable[[Verification], None] | None) -> None:
    """Read every chunk of a store being resumed; mark the simulations of missing or corrupt chunks unfinished
    and delete their corrupt chunk files, so this run simulates them again (the store is deterministic per seed)."""
    found = verify_store(out, progress=progress)
    if not found.problems:
        return
    unowned = [str(problem) for problem in found.problems if not problem.sims]
    if unowned:
        raise DatasetError(
            f"{out}: damaged outside any simulation's data ({'; '.join(unowned[:3])}), which re-simulating cannot "
            f"repair; {overwrite_advice(out)}"
        )
    if on_repair is not None:
        on_repair(found)
    attrs = dict(root.attrs[ATTRS_KEY])
    attrs["complete"] = False  # an interrupted repair reads as an interrupted run: the same command resumes it
    root.attrs[ATTRS_KEY] = attrs
    for problem in found.problems:
        if problem.problem == "corrupt":
            (out / problem.array / problem.key).unlink()  # rewritten whole or partly by the simulations below
    with writing():
        for sim in found.damaged_sims:
            root["sims/done"][sim] = False


def simulate(
    out: str | Path,
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
    on_written: Callable[[int], None] | None = None,
    on_repair: Callable[[Verification], None] | None = None,
    **params: Any,
) -> Path:
    """Simulate ``sims`` mergers into the store ``out``, resuming an interrupted store and repairing a damaged one.

    ``params`` are :class:`SimulationConfig` fields (``sims``, ``size``, ``particles``, ``mass_ratios``,
    ``pericentre``, ``cameras``, ``snapshots``, ``halo_mass`` and ``scale_radius`` (the physical units of the
    properties, :class:`~deepgalaxy.core.properties.PhysicalUnits`), ``observe``, ``seed``, ...) and, with
    ``observe=True``, the fields of :class:`~deepgalaxy.plugins.simulation.observe.Observation` (``psf_fwhm``,
    ``sky_noise``, ...). For an
    existing store, parameters not given are the store's own and those given must match them; otherwise they
    default as in :class:`SimulationConfig`. ``workers`` defaults to all cores. An existing store is read in full first
    (:func:`~deepgalaxy.core.dataset.verify_store`): simulations with a missing or corrupt chunk are simulated again
    (``on_repair(verification)`` is told first). ``on_written(sim)`` is called after each simulation is safely in
    the store. ``overwrite`` replaces a deepgalaxy store (never anything else; see :mod:`deepgalaxy.core.overwrite`).
    A fast small configuration: ``simulate(out, sims=5, particles=1500, size=64)`` (seconds).
    """
    out = Path(out).expanduser()
    existing = None if overwrite else stored_attrs(out)
    cfg = _resumed_config(out, existing, params) if existing is not None else _config(params)
    if check_output(out, overwrite=overwrite) == "store" and overwrite:
        replace_store(out)
    if existing is not None:
        import zarr

        root: Any = zarr.open_group(str(out), mode="r+", zarr_format=3)
        _repair(out, root, progress, on_repair)
    else:
        root = _create(out, cfg)
    # a store of schema version 1 has no properties group: the reader derives its properties
    directions = (np.asarray(root.attrs[ATTRS_KEY]["camera_directions"], np.float64)
                  if PROPERTIES_GROUP in root else None)
    done = np.asarray(root["sims/done"][:], dtype=bool)
    pending = [s for s in range(cfg.sims) if not done[s]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))

    bar = progress_bar(progress, cfg.sims, f"simulating {out.name}", unit="sim", initial=cfg.sims - len(pending))
    start = time.perf_counter()
    try:
        for result in _run_pool([_sim_task(cfg, s) for s in pending], workers):
            with writing():
                _write(root, cfg, result, directions)
            bar.update(1)
            if on_written is not None:
                on_written(result["sim"])
    finally:
        bar.close()
    attrs = dict(root.attrs[ATTRS_KEY])
    if not attrs.get("complete"):
        attrs["complete"] = True
        attrs["provenance"] = {**attrs.get("provenance", {}), "seconds": round(time.perf_counter() - start, 2),
                               "workers": workers}
        root.attrs[ATTRS_KEY] = attrs
    return out


def _create(out: Path, cfg: SimulationConfig) -> Any:
    shape = (cfg.size, cfg.size, 1)
    # one camera's time sequence per chunk when it fits (see core/schema.py for the measurements)
    seq_bytes = cfg.snapshots * cfg.size * cfg.size
    chunk = cfg.snapshots if seq_bytes <= MAX_CHUNK_BYTES else chunk_images_for(shape)
    attrs = store_attrs(
        source="simulation",
        num_images=cfg.num_images,
        image_shape=shape,
        chunk_images=chunk,
        generator={"name": GENERATOR, "version": PHYSICS_VERSION, "params": cfg.params()},
        extra={
            "num_sims": cfg.sims,
            "num_cameras": cfg.cameras,
            "num_snapshots": cfg.snapshots,
            "row_order": "sim, camera, snapshot (row = (sim * cameras + camera) * snapshots + snapshot)",
            "camera_directions": camera_directions(cfg.cameras).round(6).tolist(),
            "label_rule": "class = round(snapshot * (num_classes - 1) / (num_snapshots - 1))",
            "time_unit": "N-body units: G = 1, primary halo mass 1, primary NFW scale radius 1",
            "units": cfg.units.attrs(),
            "properties": sorted(PROPERTIES),
        },
    )
    return create_store(
        out, num_images=cfg.num_images, image_shape=shape, chunk_images=chunk, attrs=attrs,
        num_sims=cfg.sims, num_snapshots=cfg.snapshots, meta_chunk=cfg.images_per_sim,
        properties=tuple(sorted(PROPERTIES)),
    )


def _write(root: Any, cfg: SimulationConfig, r: dict[str, Any], directions: np.ndarray | None) -> None:
    """Write one finished simulation, then mark it done; its properties too, seen along the store's camera
    ``directions`` (None: a store of schema version 1, which has none)."""
    sim, per = r["sim"], cfg.images_per_sim
    rows = slice(sim * per, (sim + 1) * per)
    cam_grid, snap_grid = np.meshgrid(np.arange(cfg.cameras), np.arange(cfg.snapshots), indexing="ij")
    cams, snaps = cam_grid.reshape(-1), snap_grid.reshape(-1)
    root["images"][rows] = r["images"].reshape(per, cfg.size, cfg.size, 1)
    root["labels"][rows] = label_for_snapshot(snaps, cfg.snapshots)
    root["meta/sim_id"][rows] = np.full(per, sim, dtype=np.int32)
    root["meta/camera"][rows] = cams.astype(np.int16)
    root["meta/mass_ratio"][rows] = np.full(per, r["mass_ratio"], dtype=np.float32)
    root["meta/snapshot"][rows] = snaps.astype(np.int16)
    root["meta/time"][rows] = r["times"][snaps]
    root["sims/mass_ratio"][sim] = r["mass_ratio"]
    root["sims/pericentre"][sim] = r["pericentre"]
    root["sims/t_pericentre"][sim] = r["t_pericentre"]
    root["sims/t_coalescence"][sim] = r["t_coalescence"]
    root["sims/seed"][sim] = r["seed"]
    root["sims/snapshot_times"][sim] = r["times"]
    if directions is not None:
        # from the values as stored (float32), so they equal what a reader derives from a version-1 store
        t_peri, t_coal, q, peri = (float(np.float32(r[k])) for k in ("t_pericentre", "t_coalescence", "mass_ratio",
                                                                       "pericentre"))
        props = simulation_properties(r["times"][snaps], t_peri, t_coal, q, peri, directions[cams], cfg.units)
        for name, values in props.items():
            root[f"{PROPERTIES_GROUP}/{name}"][rows] = values
    root["sims/done"][sim] = True


class SimulationSource:
    """DatasetSource ``simulation``: ``create(out, progress=True, **params)`` = :func:`simulate`."""

    name = "simulation"

    def create(self, out: Path, progress: bool = True, **params: Any) -> Path:
        return simulate(out, progress=progress, **params)
