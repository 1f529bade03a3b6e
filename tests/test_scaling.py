"""Scaling arithmetic: speed-up/efficiency, the ring-allreduce cost model against hand-computed values, the plot."""

from __future__ import annotations

import math

import pytest

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.figures import plot_scaling
from deepgalaxy.core.scaling import (
    RingAllreduce,
    ScalingError,
    StepModel,
    compare_with_measured,
    speedup_efficiency,
)


def test_speedup_and_efficiency_hand_computed() -> None:
    rows = speedup_efficiency([(4, 360.0), (1, 100.0), (2, 180.0), (2, 200.0)])  # unsorted; N=2 measured twice
    assert [r.workers for r in rows] == [1, 2, 4]
    assert [r.images_per_s for r in rows] == [100.0, 190.0, 360.0]
    assert [r.speedup for r in rows] == pytest.approx([1.0, 1.9, 3.6])
    assert [r.efficiency for r in rows] == pytest.approx([1.0, 0.95, 0.9])
    assert not any(r.projected for r in rows)


def test_efficiency_is_normalised_to_smallest_measured_n() -> None:
    rows = speedup_efficiency([(2, 200.0), (4, 380.0), (8, 700.0)])
    # S(4) = 380 / 200 = 1.9, E(4) = 1.9 * 2 / 4 = 0.95; S(8) = 3.5, E(8) = 3.5 * 2 / 8 = 0.875
    assert [r.speedup for r in rows] == pytest.approx([1.0, 1.9, 3.5])
    assert [r.efficiency for r in rows] == pytest.approx([1.0, 0.95, 0.875])


def test_bad_scaling_points_raise() -> None:
    with pytest.raises(ScalingError, match="positive throughput"):
        speedup_efficiency([(1, 0.0)])
    with pytest.raises(DeepGalaxyError, match="no scaling points"):
        speedup_efficiency([])


def test_ring_allreduce_time_hand_computed() -> None:
    ring = RingAllreduce(alpha=1e-5, beta=1e9)
    assert ring.time(1, 1e8) == 0.0
    # N=4, B=1e8: 2*3*1e-5 + 2*3/4 * 1e8/1e9 = 6e-5 + 0.15
    assert ring.time(4, 1e8) == pytest.approx(0.15006, rel=1e-12)
    # N=2, B=1e6 in 3 fused messages: 2*1*3*1e-5 + 1 * 1e6/1e9
    assert ring.time(2, 1e6, messages=3) == pytest.approx(6e-5 + 1e-3, rel=1e-12)
    # reduction term: (N-1)/N * B * gamma = 0.75 * 1e8 * 1e-10 = 0.0075
    assert RingAllreduce(1e-5, 1e9, gamma=1e-10).time(4, 1e8) == pytest.approx(0.15756, rel=1e-12)
    net = RingAllreduce.from_network(bandwidth_gbit_s=10, latency_us=5)
    assert net.alpha == pytest.approx(5e-6) and net.beta == pytest.approx(1.25e9)
    assert "10 Gbit/s" in net.describe() and "5 us" in net.describe()
    with pytest.raises(ScalingError):
        RingAllreduce(alpha=-1, beta=1e9)


def test_fit_recovers_alpha_and_beta() -> None:
    truth = RingAllreduce(alpha=2e-5, beta=3e9)
    sizes = [4e3, 4e5, 4e7, 1e8]
    fitted = RingAllreduce.fit([(2, b, truth.time(2, b)) for b in sizes])
    assert fitted.alpha == pytest.approx(2e-5, rel=1e-6) and fitted.beta == pytest.approx(3e9, rel=1e-6)
    fitted = RingAllreduce.fit([(n, b, truth.time(n, b)) for n in (2, 4, 8) for b in sizes])
    assert (fitted.alpha, fitted.beta) == pytest.approx((2e-5, 3e9), rel=1e-6)
    # gamma has the bandwidth term's form: the fit folds it into an effective beta, 1/beta_eff = 1/beta + gamma/2
    with_gamma = RingAllreduce(alpha=2e-5, beta=3e9, gamma=5e-11)
    fitted = RingAllreduce.fit([(n, b, with_gamma.time(n, b)) for n in (2, 4, 8) for b in sizes])
    assert fitted.beta == pytest.approx(1 / (1 / 3e9 + 5e-11 / 2), rel=1e-6)
    assert fitted.time(16, 5e7) == pytest.approx(with_gamma.time(16, 5e7), rel=1e-6)
    noisy = [(2, b, truth.time(2, b) * f) for b, f in zip(sizes, (1.05, 0.95, 1.02, 0.99), strict=True)]
    assert RingAllreduce.fit(noisy).beta == pytest.approx(3e9, rel=0.1)


def test_fit_refuses_unidentifiable_data() -> None:
    with pytest.raises(ScalingError, match="two message sizes"):
        RingAllreduce.fit([(2, 1e6, 0.01), (2, 1e6, 0.011)])
    with pytest.raises(ScalingError, match="larger"):
        RingAllreduce.fit([(2, 1e3, 0.02), (2, 1e7, 0.01)])


def test_step_model_projection_hand_computed() -> None:
    net = RingAllreduce(alpha=1e-5, beta=1e9)
    model = StepModel(compute_s=0.1, gradient_bytes=4e7, batch_per_worker=16, network=net)
    assert model.messages == 1
    # N=8: allreduce = 2*7*1e-5 + 2*7/8 * 0.04 = 0.07014; step = 0.17014; E = 0.1 / 0.17014
    rows = {r.workers: r for r in model.project(n0=1)}
    assert sorted(rows) == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert rows[8].allreduce_s == pytest.approx(0.07014, rel=1e-12)
    assert rows[8].step_s == pytest.approx(0.17014, rel=1e-12)
    assert rows[8].efficiency == pytest.approx(0.1 / 0.17014, rel=1e-12)
    assert rows[8].images_per_s == pytest.approx(8 * 16 / 0.17014, rel=1e-12)
    # N=1024: 0.1 / (0.1 + 2*1023*1e-5 + 2*1023/1024*0.04)
    assert rows[1024].efficiency == pytest.approx(0.1 / (0.1 + 0.02046 + 0.08 * 1023 / 1024), rel=1e-12)
    assert all(r.projected for r in rows.values())
    effs = [rows[n].efficiency for n in sorted(rows)]
    assert effs == sorted(effs, reverse=True)
    # overlap hides up to overlap * compute of the allreduce
    half = StepModel(0.1, 4e7, 16, net, overlap=0.5)
    assert half.project([8])[0].efficiency == pytest.approx(0.1 / (0.1 + 0.07014 - 0.05), rel=1e-12)
    assert StepModel(0.1, 4e7, 16, net, overlap=1.0).project([8])[0].efficiency == pytest.approx(1.0)
    # gradients larger than Horovod's 64 MiB fusion buffer go in several messages
    assert StepModel(0.1, 1e8, 16, net).messages == 2
    assert StepModel.from_throughput(160.0, 16, 4e7, net).compute_s == pytest.approx(0.1)
    with pytest.raises(ScalingError, match="overlap"):
        StepModel(0.1, 4e7, 16, net, overlap=1.5)



def test_measured_message_count_pays_latency_per_message() -> None:
    net = RingAllreduce(alpha=1e-3, beta=1e9)
    assert StepModel(0.1, 4e7, 16, net).messages == 1  # one 64 MiB fusion buffer by default
    model = StepModel(0.1, 4e7, 16, net, fused_messages=12)  # e.g. 12 fusion cycles seen in a Horovod timeline
    assert model.messages == 12
    # N=2: 2*1*12*1e-3 + 2*1/2 * 4e7/1e9 = 0.024 + 0.04
    assert model.allreduce_s(2) == pytest.approx(0.064, rel=1e-12)
    assert model.step_s(2) == pytest.approx(0.164, rel=1e-12)
    # N=8: 2*7*12*1e-3 + 2*7/8 * 0.04
    assert model.allreduce_s(8) == pytest.approx(0.168 + 0.07, rel=1e-12)
    with pytest.raises(ScalingError, match="fused_messages"):
        StepModel(0.1, 4e7, 16, net, fused_messages=0)


def test_min_compute_for_an_efficiency_solves_the_model() -> None:
    net = RingAllreduce.from_network(100.0, 5.0)
    for overlap, messages in ((0.0, None), (0.3, None), (0.0, 20)):
        probe = StepModel(1.0, 7e7, 8, net, overlap, fused_messages=messages)
        need = probe.min_compute_s(512, 0.9)
        # by hand: allreduce(512) / (overlap + (1 - 0.9) / 0.9)
        assert need == pytest.approx(probe.allreduce_s(512) / (overlap + 1 / 9), rel=1e-12)
        at = StepModel(need, 7e7, 8, net, overlap, fused_messages=messages)
        assert at.project([512])[0].efficiency == pytest.approx(0.9, rel=1e-9)
        slower = StepModel(need * 1.01, 7e7, 8, net, overlap, fused_messages=messages)
        faster = StepModel(need * 0.99, 7e7, 8, net, overlap, fused_messages=messages)
        assert slower.project([512])[0].efficiency > 0.9 > faster.project([512])[0].efficiency
    with pytest.raises(ScalingError, match="overlap > 0"):
        StepModel(1.0, 7e7, 8, net).min_compute_s(512, 1.0)
    with pytest.raises(ScalingError, match="efficiency"):
        StepModel(1.0, 7e7, 8, net).min_compute_s(512, 0.0)

def test_compare_with_measured_one_vs_two_workers() -> None:
    model = StepModel(compute_s=0.1, gradient_bytes=4e7, batch_per_worker=16, network=RingAllreduce(1e-5, 1e9))
    measured = speedup_efficiency([(1, 160.0), (2, 150.0)])
    cmp = {int(c["workers"]): c for c in compare_with_measured(model, measured)}
    assert cmp[1]["predicted_efficiency"] == pytest.approx(1.0)
    # measured E(2) = 150/160/2; predicted = 0.1 / (0.1 + 2e-5 + 0.04)
    assert cmp[2]["measured_efficiency"] == pytest.approx(0.46875)
    assert cmp[2]["predicted_efficiency"] == pytest.approx(0.1 / 0.14002, rel=1e-12)
    assert cmp[2]["error"] == pytest.approx(0.1 / 0.14002 - 0.46875, rel=1e-9)


@pytest.mark.slow  # importing matplotlib takes seconds on a busy machine
def test_plot_marks_projection_and_prints_efficiency(tmp_path) -> None:
    measured = speedup_efficiency([(1, 100.0), (2, 185.0)])
    model = StepModel.from_throughput(100.0, 16, 4e7, RingAllreduce.from_network(25, 5))
    projected = model.project()
    fig = plot_scaling(measured, projected, path=tmp_path / "plots" / "scaling.png")
    png = (tmp_path / "plots" / "scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    ax = fig.axes[0]
    assert "PROJECTION" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("projection" in t for t in labels) and any("measured" in t for t in labels)
    assert any("ideal" in t for t in labels) and any("throughput" in t for t in labels)
    printed = {t.get_text() for t in ax.texts}
    assert "0.93" in printed  # measured E(2) = 185/100/2 = 0.925 -> "0.93" (round half to even of 0.925 float)
    assert f"{projected[-1].efficiency:.2f}" in printed
    only_measured = plot_scaling(measured)
    assert "PROJECTION" not in only_measured.axes[0].get_title()
    assert math.isclose(measured[1].efficiency, 0.925)
    with pytest.raises(ScalingError, match="nothing to plot"):
        plot_scaling([])
