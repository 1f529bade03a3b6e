"""The observing effects of ``deepgalaxy data simulate --observe``, one at a time and all together, on one snapshot
of one simulated merger: the README's docs/observe_gallery.png.

    python scripts/observe_gallery.py                        # writes docs/observe_gallery.png (about a minute)
    python scripts/observe_gallery.py --out /tmp/g.png --snapshot 30 --camera 2

Each panel is rendered as a store renders it (every snapshot of the simulation shares one brightness scale) with the
seed the store would use, so a panel is what `data simulate --observe` with the panel's options writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepgalaxy.core.figures import panels_figure  # noqa: E402
from deepgalaxy.plugins.simulation.observe import Observation, draw_poses, streams  # noqa: E402
from deepgalaxy.plugins.simulation.physics import MergerParams, simulate_merger  # noqa: E402
from deepgalaxy.plugins.simulation.render import render_simulation  # noqa: E402
from deepgalaxy.plugins.simulation.source import SimulationConfig  # noqa: E402

NONE: dict[str, Any] = dict(psf_fwhm=0.0, sky_noise=0.0, stars=0.0)
"""No effect at all: each panel switches on its own."""
POSE = dict(NONE, shift=0.5, scale_jitter=0.3, pa_jitter=180.0)
SURVEY = dict(psf="moffat", psf_fwhm=4.0, sky_noise=3e-3, peak_counts=500.0, stars=8.0, background_galaxies=6.0,
              shift=0.5, scale_jitter=0.3, pa_jitter=180.0, redshift=0.2)
PANELS: list[tuple[str, dict[str, Any] | None]] = [
    ("clean (no --observe)", None),
    ("--psf-fwhm 4\n(Gaussian)", dict(NONE, psf_fwhm=4.0)),
    ("--psf moffat --psf-fwhm 4\n(beta 4.765)", dict(NONE, psf="moffat", psf_fwhm=4.0)),
    ("--sky-noise 3e-3\n(6.3 mag below the centre)", dict(NONE, sky_noise=3e-3)),
    ("--peak-counts 300\n(shot noise)", dict(NONE, peak_counts=300.0)),
    ("--stars 20 --star-mags 0,7\n(Gaussian PSF 3.53 px)", dict(NONE, psf_fwhm=Observation().psf_fwhm, stars=20.0,
                                                               star_mags=(0.0, 7.0))),
    ("--background-galaxies 6\n(mags 2-7, r_e 0.5-3 px)", dict(NONE, background_galaxies=6.0)),
    ("--shift 0.5 --scale-jitter 0.3\n--pa-jitter 180", POSE),
    ("--redshift 0.5 (x1/5.1)\nwith --sky-noise 1e-3", dict(NONE, sky_noise=1e-3, redshift=0.5)),
    ("--redshift 0 (same sky)", dict(NONE, sky_noise=1e-3)),
    ("--observe\n(its defaults)", {}),
    ("all: moffat 4, sky 3e-3, counts 500,\n8 stars, 6 galaxies, pose, z 0.2", SURVEY),
]


def main() -> None:
    cfg = SimulationConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "observe_gallery.png")
    parser.add_argument("--mass-ratio", type=float, default=0.5)
    parser.add_argument("--pericentre", type=float, default=0.6)
    parser.add_argument("--snapshot", type=int, default=28, help="time step shown (0-70)")
    parser.add_argument("--camera", type=int, default=4, help="camera shown (4 looks down on the orbital plane)")
    parser.add_argument("--size", type=int, default=cfg.size)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    result = simulate_merger(
        MergerParams(mass_ratio=args.mass_ratio, pericentre=args.pericentre, particles=cfg.particles,
                     snapshots=cfg.snapshots, t_end=cfg.t_end, dt=cfg.dt, friction=cfg.friction),
        np.random.default_rng(args.seed),
    )
    panels = []
    for caption, options in PANELS:
        observation = None if options is None else Observation(**options)
        images = render_simulation(result.positions, result.centres, result.weights, args.size, args.camera + 1,
                                   cfg.half_width, observation, seed=args.seed)
        if options is POSE:  # what was drawn for this image
            pose = draw_poses(Observation(**POSE), streams(args.seed)["pose"], (cfg.snapshots, args.camera + 1))
            assert pose is not None
            at = (args.snapshot, args.camera)
            caption += (f"\n(here {np.degrees(pose.angle[at]):+.0f} deg, x{pose.scale[at]:.2f}, "
                        f"{pose.dx[at]:+.2f},{pose.dy[at]:+.2f} px)")
        panels.append((caption, images[args.snapshot, args.camera]))
        print(f"rendered: {caption.splitlines()[0]}", flush=True)
    title = (f"data simulate --observe: mass ratio {args.mass_ratio:g}, pericentre {args.pericentre:g}, "
             f"snapshot {args.snapshot}, camera {args.camera}, {args.size} px")
    print(f"wrote {panels_figure(panels, args.out, title=title, cols=6)}")


if __name__ == "__main__":
    main()
