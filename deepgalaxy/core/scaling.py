"""Scaling arithmetic: speed-up and efficiency of data-parallel training, and a ring-allreduce projection.

Measured scaling (paper, Fig. 7). With throughput ``T(N)`` in images per second at ``N`` workers and ``N0`` the
smallest worker count measured::

    speed-up   S(N) = T(N) / T(N0)
    efficiency E(N) = S(N) * N0 / N          (1 = perfect linear scaling)

Projection beyond this machine (a *model*, never a measurement). Each data-parallel step is the local compute
(forward, backward, optimizer update; per-worker batch fixed, i.e. weak scaling as in the paper) followed by an
allreduce of the gradients. A ring allreduce of ``B`` bytes over ``N`` workers (reduce-scatter then all-gather,
Patarasuk & Yuan 2009; Horovod's and NCCL's algorithm) costs::

    T_allreduce(N, B) = 2 (N - 1) * m * alpha  +  2 (N - 1) / N * B / beta  +  (N - 1) / N * B * gamma

``alpha`` is the per-message latency (s), ``beta`` the per-link bandwidth (bytes/s), ``gamma`` the time to add
one byte during the reduction (s/byte, often negligible), and ``m`` the number of fused messages the gradients are
sent in (Horovod's tensor fusion packs them into buffers of 64 MB by default, so at least ``m = ceil(B / 64 MB)``;
it also sends whatever gradients are ready every fusion cycle, ``HOROVOD_CYCLE_TIME``, so a long backward pass
splits them into more messages: give the count measured in a Horovod timeline where you have one).
Backpropagation lets part of the allreduce run while later layers still compute; a fraction ``overlap`` of the
compute time can hide communication::

    T_step(N)   = T_compute + max(0, T_allreduce(N, B) - overlap * T_compute)
    T(N)        = N * batch / T_step(N)
    E(N)        = T_step(N0) / T_step(N)     (the efficiency definition above, for equal per-worker batches)

Solved for the compute time (:meth:`StepModel.min_compute_s`): ``E(N) >= E*`` (from ``N0 = 1``) holds exactly when
``T_compute >= T_allreduce(N, B) / (overlap + (1 - E*) / E*)``, the shortest step a GPU may take for that goal.

Assumptions (and so the limits of the projection): every worker computes equally fast (no stragglers); the
network is a homogeneous ring with bandwidth ``beta`` on every link and no contention (a real cluster adds
topology effects: hierarchical allreduce, oversubscribed switches); the input pipeline keeps up; the per-worker
batch and the model are the same at every N. ``alpha``/``beta`` can be given (``--bandwidth``/``--latency`` flags,
:meth:`RingAllreduce.from_network`) or fitted by least squares to allreduce times measured here for several
message sizes (:meth:`RingAllreduce.fit`; a fitted ``beta`` is an effective bandwidth that absorbs ``gamma``).
Fitted on one machine's loopback or shared-memory transport, alpha and beta describe that machine, not a
cluster network: use them to check the model at N = 2 and give the cluster's numbers for the projection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError

PROJECTED_WORKERS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
HOROVOD_FUSION_BYTES = 64 * 1024 * 1024
"""Horovod's default tensor-fusion buffer (HOROVOD_FUSION_THRESHOLD)."""


class ScalingError(DeepGalaxyError, ValueError):
    """Scaling measurements or model parameters that cannot be used (says which and why)."""


@dataclass(frozen=True)
class ScalingRow:
    """Throughput, speed-up and efficiency at one worker count; ``projected`` marks model output."""

    workers: int
    images_per_s: float
    speedup: float
    efficiency: float
    projected: bool = False
    step_s: float | None = None
    allreduce_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def speedup_efficiency(points: Iterable[tuple[int, float]]) -> list[ScalingRow]:
    """Speed-up and efficiency from measured ``(workers, images_per_s)`` pairs, normalised to the smallest N.

    Repeated measurements at one worker count are averaged. Rows come back sorted by workers.
    """
    by_n: dict[int, list[float]] = {}
    for workers, throughput in points:
        if int(workers) < 1 or not math.isfinite(throughput) or throughput <= 0:
            raise ScalingError(
                f"a scaling point needs workers >= 1 and a positive throughput, got ({workers}, {throughput})"
            )
        by_n.setdefault(int(workers), []).append(float(throughput))
    if not by_n:
        raise ScalingError("no scaling points given: measure at least one worker count")
    n0 = min(by_n)
    t0 = float(np.mean(by_n[n0]))
    rows = []
    for n in sorted(by_n):
        t = float(np.mean(by_n[n]))
        s = t / t0
        rows.append(ScalingRow(n, t, s, s * n0 / n))
    return rows


@dataclass(frozen=True)
class RingAllreduce:
    """Ring-allreduce cost model ``2(N-1) m alpha + 2(N-1)/N B/beta + (N-1)/N B gamma`` (see module docstring).

    ``alpha``: latency per message and ring step (s); ``beta``: link bandwidth (bytes/s); ``gamma``: reduction
    cost (s/byte).
    """

    alpha: float
    beta: float
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta <= 0 or self.gamma < 0:
            raise ScalingError(
                f"ring-allreduce parameters must be alpha >= 0, beta > 0, gamma >= 0; got alpha={self.alpha}, "
                f"beta={self.beta}, gamma={self.gamma}"
            )

    @classmethod
    def from_network(cls, bandwidth_gbit_s: float, latency_us: float, gamma: float = 0.0) -> RingAllreduce:
        """A model from a link bandwidth in Gbit/s and a latency in microseconds (the CLI's flags)."""
        if bandwidth_gbit_s <= 0 or latency_us < 0:
            raise ScalingError(
                f"bandwidth must be > 0 Gbit/s and latency >= 0 us, got {bandwidth_gbit_s} and {latency_us}"
            )
        return cls(alpha=latency_us * 1e-6, beta=bandwidth_gbit_s * 1e9 / 8, gamma=gamma)

    def time(self, workers: int, nbytes: float, messages: int = 1) -> float:
        """Seconds to allreduce ``nbytes`` over ``workers`` in ``messages`` fused buffers (0 for one worker)."""
        n = int(workers)
        if n < 1:
            raise ScalingError(f"workers must be >= 1, got {workers}")
        if n == 1:
            return 0.0
        latency = 2 * (n - 1) * messages * self.alpha
        return latency + 2 * (n - 1) / n * nbytes / self.beta + (n - 1) / n * nbytes * self.gamma

    @classmethod
    def fit(cls, samples: Iterable[tuple[int, float, float]]) -> RingAllreduce:
        """Fit ``alpha`` and ``beta`` to measured ``(workers, nbytes, seconds)`` allreduce times.

        Non-negative least squares on relative errors (each equation divided by its measured time), so the
        latency-dominated small messages count as much as the bandwidth-dominated large ones. Needs at least two
        message sizes. ``gamma`` is not fitted: its term has the same ``(N - 1) / N * B`` form as the bandwidth
        term, so measured times cannot tell them apart and the fitted ``beta`` is an *effective* bandwidth that
        includes the reduction cost (``1 / beta_eff = 1 / beta + gamma / 2``).
        """
        from scipy.optimize import nnls

        rows = [(int(n), float(b), float(t)) for n, b, t in samples if int(n) > 1]
        if len({b for _, b, _ in rows}) < 2:
            raise ScalingError("fitting the allreduce model needs times for at least two message sizes at >= 2 workers")
        if any(t <= 0 for _, _, t in rows):
            raise ScalingError("measured allreduce times must be positive")
        x = np.array([[2 * (n - 1), 2 * (n - 1) / n * b] for n, b, _ in rows])
        t = np.array([t for _, _, t in rows])
        coef, _ = nnls(x / t[:, None], np.ones_like(t))
        if coef[1] <= 0:
            raise ScalingError(
                "the measured times do not grow with message size, so no bandwidth can be fitted; measure larger "
                "messages (tens of MB)"
            )
        return cls(alpha=float(coef[0]), beta=float(1 / coef[1]))

    def describe(self) -> str:
        """Short human-readable parameters, for legends and logs."""
        text = f"latency {self.alpha * 1e6:.3g} us, bandwidth {self.beta * 8 / 1e9:.3g} Gbit/s"
        return text + (f", reduction {self.gamma * 1e9:.3g} ns/byte" if self.gamma else "")


@dataclass(frozen=True)
class StepModel:
    """Time of one data-parallel step: measured compute plus the modelled, partly hidden gradient allreduce.

    ``compute_s``: one worker's step time without communication (measure at N=1); ``gradient_bytes``: size of
    all gradients (parameters x 4 bytes in fp32); ``batch_per_worker``: images per worker per step; ``overlap``:
    fraction of ``compute_s`` that can hide communication (0 = none, the conservative default; up to 1);
    ``fused_messages``: allreduce messages per step as measured (Horovod timeline), else ``ceil(B / fusion_bytes)``.
    """

    compute_s: float
    gradient_bytes: float
    batch_per_worker: int
    network: RingAllreduce
    overlap: float = 0.0
    fusion_bytes: float = HOROVOD_FUSION_BYTES
    fused_messages: int | None = None

    def __post_init__(self) -> None:
        if self.compute_s <= 0 or self.gradient_bytes < 0 or self.batch_per_worker < 1:
            raise ScalingError("compute_s must be > 0, gradient_bytes >= 0 and batch_per_worker >= 1")
        if self.fused_messages is not None and self.fused_messages < 1:
            raise ScalingError(f"fused_messages counts allreduce messages per step (>= 1), got {self.fused_messages}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ScalingError(f"overlap is a fraction of the compute time in [0, 1], got {self.overlap}")

    @classmethod
    def from_throughput(
        cls, images_per_s: float, batch_per_worker: int, gradient_bytes: float, network: RingAllreduce,
        overlap: float = 0.0,
    ) -> StepModel:
        """Calibrate ``compute_s`` from a measured single-worker throughput: ``batch / images_per_s``."""
        return cls(batch_per_worker / images_per_s, gradient_bytes, batch_per_worker, network, overlap)

    @property
    def messages(self) -> int:
        """Allreduce messages per step: the measured ``fused_messages``, else ``ceil(gradient_bytes / fusion_bytes)``
        (at least 1)."""
        if self.fused_messages is not None:
            return self.fused_messages
        return max(1, math.ceil(self.gradient_bytes / self.fusion_bytes))

    def allreduce_s(self, workers: int) -> float:
        return self.network.time(workers, self.gradient_bytes, self.messages)

    def step_s(self, workers: int) -> float:
        """``compute + max(0, allreduce - overlap * compute)``."""
        return self.compute_s + max(0.0, self.allreduce_s(workers) - self.overlap * self.compute_s)

    def images_per_s(self, workers: int) -> float:
        return workers * self.batch_per_worker / self.step_s(workers)

    def min_compute_s(self, workers: int, efficiency: float) -> float:
        """The least compute time per step for which ``E(workers) >= efficiency`` (relative to one worker), with
        this model's gradients, network, overlap and messages: ``allreduce / (overlap + (1 - E) / E)``."""
        if not 0.0 < efficiency <= 1.0:
            raise ScalingError(f"the efficiency to reach is in (0, 1], got {efficiency}")
        slack = self.overlap + (1.0 - efficiency) / efficiency
        if slack == 0.0:
            raise ScalingError("an efficiency of 1 needs overlap > 0: without overlap every allreduce costs time")
        return self.allreduce_s(workers) / slack

    def project(self, workers: Sequence[int] = PROJECTED_WORKERS, n0: int = 1) -> list[ScalingRow]:
        """Projected rows (``projected=True``) at each worker count, speed-up and efficiency relative to ``n0``."""
        base = self.images_per_s(n0)
        rows = []
        for n in workers:
            t = self.images_per_s(n)
            s = t / base
            rows.append(ScalingRow(int(n), t, s, s * n0 / n, True, self.step_s(n), self.allreduce_s(n)))
        return rows


def compare_with_measured(model: StepModel, measured: Sequence[ScalingRow]) -> list[dict[str, float]]:
    """Predicted vs measured efficiency at each measured worker count (normalised to the smallest measured N)."""
    if not measured:
        return []
    n0 = min(r.workers for r in measured)
    predicted = {r.workers: r for r in model.project([r.workers for r in measured], n0=n0)}
    return [
        {
            "workers": float(r.workers),
            "measured_efficiency": r.efficiency,
            "predicted_efficiency": predicted[r.workers].efficiency,
            "error": predicted[r.workers].efficiency - r.efficiency,
        }
        for r in measured
    ]


__all__ = [
    "HOROVOD_FUSION_BYTES",
    "PROJECTED_WORKERS",
    "RingAllreduce",
    "ScalingError",
    "ScalingRow",
    "StepModel",
    "compare_with_measured",
    "speedup_efficiency",
]
