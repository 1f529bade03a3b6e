"""The torch plugin's CPU speed-ups change nothing but speed: the folded depthwise weight gradient equals torch's own,
it is used where this machine measured it to win (or where the switch forces it), and the allocator setting really
keeps freed pages mapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from deepgalaxy.core import workers  # noqa: E402
from deepgalaxy.core.errors import DeepGalaxyError  # noqa: E402
from deepgalaxy.core.specs import BackboneSpec  # noqa: E402
from deepgalaxy.plugins.torch import capability  # noqa: E402
from deepgalaxy.plugins.torch.backbones import depthwise, efficientnet_b0  # noqa: E402
from deepgalaxy.plugins.torch.backbones.depthwise import depthwise_conv2d, use_folded_gradient  # noqa: E402
from deepgalaxy.plugins.torch.backbones.efficientnet import KerasConv2d  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("channels", "size", "kernel"), [(3, 6, 5), (2, 5, 7), (4, 7, 3)])
def test_folded_gradient_passes_gradcheck(channels: int, size: int, kernel: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, channels, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.rand(channels, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_conv2d(a, b, kernel // 2), (x, w))


def test_folded_gradient_equals_torch_in_channels_last() -> None:
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(4, 24, 8, 8).contiguous(memory_format=cl).requires_grad_()
    w = torch.randn(24, 1, 5, 5).contiguous(memory_format=cl).requires_grad_()
    g = torch.randn(4, 24, 8, 8)
    out = depthwise_conv2d(x, w, 2)
    out.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.conv2d(x2, w2, padding=2, groups=24)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-4)
    assert w.grad.is_contiguous(memory_format=cl)  # the optimizer sees the parameter's own layout


def test_folded_gradient_is_used_only_on_stride_1_depthwise_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(depthwise.SWITCH_ENV, "1")
    dw5 = KerasConv2d(240, 240, 5, groups=240)
    x = torch.zeros(2, 240, 16, 16)
    assert use_folded_gradient(dw5, x) and use_folded_gradient(KerasConv2d(240, 240, 3, groups=240), x)
    assert not use_folded_gradient(KerasConv2d(240, 240, 5, stride=2, groups=240), x)
    assert not use_folded_gradient(KerasConv2d(240, 480, 5, groups=240), x)  # not depthwise
    with torch.no_grad():
        assert not use_folded_gradient(dw5, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_folded_gradient(dw5, x)
    monkeypatch.setenv(depthwise.SWITCH_ENV, "0")
    assert not use_folded_gradient(dw5, x)
    monkeypatch.setenv(depthwise.SWITCH_ENV, "yes")
    with pytest.raises(DeepGalaxyError, match="DEEPGALAXY_FOLDED_GRADIENT='yes'"):
        use_folded_gradient(dw5, x)


def test_auto_decision_follows_this_machines_measurement_and_is_kept(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """auto times both gradients once per shape, decides by the times, and keeps them per machine in the user's cache
    folder (JSON): a later process reads the decision instead of measuring; an unreadable cache is measured again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(depthwise.SWITCH_ENV, raising=False)
    conv = KerasConv2d(8, 8, 5, groups=8)
    x = torch.zeros(2, 8, 6, 6)
    decision = use_folded_gradient(conv, x)
    path = tmp_path / "deepgalaxy" / capability.CACHE_NAME
    records = json.loads(path.read_text())[capability.machine_key()]["folded_depthwise_gradient"]
    (case, record), = records.items()
    assert case == "2x8x6x6 k5 contiguous" and record["builtin_ms"] > 0 and record["folded_ms"] > 0
    assert decision == record["folded"] == (record["folded_ms"] < depthwise.WIN_FRACTION * record["builtin_ms"])
    for kept in (True, False):  # what is kept decides, both ways (no new measurement)
        records[case] = {**record, "folded": kept}
        path.write_text(json.dumps({capability.machine_key(): {"folded_depthwise_gradient": records}}))
        assert use_folded_gradient(conv, x) is kept
    path.write_text("{not json")
    assert use_folded_gradient(conv, x) in (True, False)
    assert case in json.loads(path.read_text())[capability.machine_key()]["folded_depthwise_gradient"]


def test_weight_gradient_times_time_the_real_gradients() -> None:
    times = depthwise.weight_gradient_times((2, 4, 6, 6), 5, channels_last=True)
    assert set(times) == {"builtin", "folded"} and all(0 < t < 10 for t in times.values())


def test_efficientnet_gradients_do_not_depend_on_the_folded_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = efficientnet_b0(BackboneSpec(name="efficientnet-b0", options={"drop_connect_rate": 0.0}), 1)
        net = net.to(memory_format=torch.channels_last)
        x = torch.rand(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
        net(x).square().mean().backward()
        return {n: p.grad for n, p in net.named_parameters()}

    monkeypatch.setenv(depthwise.SWITCH_ENV, "1")
    folded = grads()
    monkeypatch.setenv(depthwise.SWITCH_ENV, "0")
    builtin = grads()
    changed = [n for n in folded if "dwconv" in n and not torch.equal(folded[n], builtin[n])]
    assert "blocks.block6b.dwconv.weight" in changed  # the folded path did run on B0's 5x5 stride-1 blocks
    for name in folded:
        torch.testing.assert_close(folded[name], builtin[name], rtol=1e-4, atol=1e-6, msg=name)


FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from deepgalaxy.plugins.torch.allocator import keep_freed_memory
    print(keep_freed_memory())
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(8 << 20)  # 64 MiB allocated, touched and freed once
    before = faults()
    for _ in range(5):
        np.ones(8 << 20)
    print(faults() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_allocator_keeps_freed_pages_mapped(setting: str) -> None:
    """With the setting a freed 64 MiB buffer is reused without page faults; without it each one faults again
    (at least once per 2 MiB huge page: numpy asks for transparent huge pages)."""
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                         env={"DEEPGALAXY_MALLOPT": setting, "PATH": ""}).stdout.split()
    huge_pages = 64 // 2
    if setting == "1":
        assert out[0] == "True" and int(out[1]) < huge_pages
    else:
        assert out[0] == "False" and int(out[1]) >= 5 * huge_pages


def _topology(root: Path, core_of: dict[int, int]) -> Path:
    for cpu, core in core_of.items():
        (root / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (root / f"cpu{cpu}" / "topology" / "physical_package_id").write_text("0\n")
        (root / f"cpu{cpu}" / "topology" / "core_id").write_text(f"{core}\n")
    return root


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="sched_getaffinity")
def test_threads_are_physical_cores_available_divided_among_workers(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    smt = _topology(tmp_path / "smt", {c: i // 2 for i, c in enumerate(cpus)})  # two hyper-threads per core
    own = _topology(tmp_path / "own", {c: i for i, c in enumerate(cpus)})
    assert workers.available_cores(smt) == (len(cpus) + 1) // 2
    assert workers.available_cores(own) == len(cpus)
    assert workers.available_cores(tmp_path / "missing") == len(cpus)  # unreadable topology: logical CPUs
    monkeypatch.delenv(workers.THREADS_ENV, raising=False)
    assert workers.threads_per_worker(2, cores=8) == 4 and workers.threads_per_worker(4, cores=2) == 1
    monkeypatch.setenv(workers.THREADS_ENV, "3")
    assert workers.threads_per_worker(2, cores=8) == 3
    monkeypatch.setenv(workers.THREADS_ENV, "many")
    with pytest.raises(DeepGalaxyError, match="DEEPGALAXY_THREADS='many'"):
        workers.threads_per_worker(2)
