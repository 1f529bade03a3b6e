"""The torch plugin on a CUDA GPU (issue 18): device selection, training steps in fp32, bf16 and fp16 (with its loss
scaler, kept in the checkpoint), a CPU-trained model on the GPU and back, Horovod pinning each rank to its local
rank's GPU (2 GPUs), and an out-of-memory batch reported with a batch size that fits. Skipped, with the reason,
where no GPU is visible."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepgalaxy import registry  # noqa: E402
from deepgalaxy.core.errors import DeviceError  # noqa: E402
from deepgalaxy.core.interfaces import Distributed  # noqa: E402
from deepgalaxy.core.model import Model  # noqa: E402
from deepgalaxy.core.specs import TrainSpec, with_overrides  # noqa: E402
from deepgalaxy.plugins.torch import devices  # noqa: E402
from tests.runs_support import CARD  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here")]

BF16 = pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
                          reason="this GPU has no native bf16")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny full-simple (32 px), trained a few steps on the CPU and saved."""
    card = with_overrides(registry.card(CARD), {"input_size": 32, "backbone.options.widths": [8, 16],
                                                "decoder_channels": [16, 8], "head_hidden": [16]})
    model = registry.create(card, framework="torch", seed=1)
    trainer = model.backend.trainer(model.native, model.card, TrainSpec(learning_rate=0.01), Distributed())
    for step in range(3):
        trainer.train_step(images(8, seed=step), np.arange(8) % 4)
    return model.save(tmp_path_factory.mktemp("model") / "m")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 1), dtype=np.float32)


def on(model: Model) -> set[str]:
    return {str(p.device) for p in model.native.parameters()}


def test_device_selection_sees_the_gpus(saved: Path) -> None:
    gpus = devices.accelerators()
    assert [g.index for g in gpus] == list(range(torch.cuda.device_count()))
    assert gpus[0].name == torch.cuda.get_device_name(0) and gpus[0].memory_bytes > 0
    model = registry.load(saved)  # auto: the GPU
    assert model.device == "cuda:0" and on(model) == {"cuda:0"}
    last = f"cuda:{len(gpus) - 1}"
    assert on(registry.load(saved, device=last)) == {last}
    with pytest.raises(DeviceError, match=f"'cuda:{len(gpus)}'.*only {len(gpus)} GPU"):
        registry.load(saved, device=f"cuda:{len(gpus)}")
    assert registry.load(saved, device="cuda", precision="auto").precision == (
        "bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_a_cpu_trained_model_on_the_gpu_and_back(saved: Path) -> None:
    x = images(16, seed=5)
    cpu = registry.load(saved, device="cpu")
    gpu = registry.load(saved, device="cuda")
    np.testing.assert_allclose(gpu.predict(x).probabilities, cpu.predict(x).probabilities, atol=1e-4)
    np.testing.assert_allclose(gpu.encode(x), cpu.encode(x), atol=1e-3)
    assert gpu.reconstruct(x).dtype == np.float32
    back = gpu.to("cpu")
    assert on(back) == {"cpu"}
    weights, original = back.get_weights(), cpu.get_weights()
    assert all(np.array_equal(weights[k], original[k]) for k in original)  # the trip changed nothing


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=BF16), "fp16"])
def test_training_steps_on_the_gpu(saved: Path, precision: str, tmp_path: Path) -> None:
    model = registry.load(saved, device="cuda")
    before = model.get_weights()
    train = TrainSpec(batch_size=8, learning_rate=0.01, precision=precision)  # type: ignore[arg-type]
    trainer = model.backend.trainer(model.native, model.card, train, Distributed())
    assert (str(trainer.device), trainer.precision) == ("cuda:0", precision)
    assert (trainer.scaler is not None) == (precision == "fp16")
    for step in range(3):
        res = trainer.train_step(images(8, seed=step), np.arange(8) % 4)
        assert np.isfinite(res.losses["loss"]) and res.predicted is not None and res.predicted.dtype.kind == "i"
    after = model.get_weights()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    trainer.save_checkpoint(tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    if precision == "fp16":
        assert state["scaler"]["scale"] == trainer.scaler.get_scale() > 0
    # the checkpoint is device-independent: it resumes on the CPU (fp16's scaler is left behind)
    cpu = registry.load(saved, device="cpu")
    on_cpu = cpu.backend.trainer(cpu.native, cpu.card, train.model_copy(update={"precision": "fp32"}),
                                 Distributed())
    on_cpu.load_checkpoint(tmp_path / "ckpt")
    assert on_cpu.step == 3 and all(np.array_equal(cpu.get_weights()[k], after[k]) for k in after)
    # and back onto the GPU, scaler included
    again = registry.load(saved, device="cuda")
    resumed = again.backend.trainer(again.native, again.card, train, Distributed())
    resumed.load_checkpoint(tmp_path / "ckpt")
    if precision == "fp16":
        assert resumed.scaler.get_scale() == trainer.scaler.get_scale()
    assert np.isfinite(resumed.train_step(images(8, seed=9), np.arange(8) % 4).losses["loss"])


@pytest.fixture
def small_gpu() -> Iterator[int]:
    """The GPU limited to 512 MiB for this process (so running out of memory is quick and cheap); its limit."""
    limit = 512 * 2**20
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory, 0)
    try:
        yield limit
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def suggested(error: DeviceError, batch: int) -> int:
    text = str(error)
    assert f"batch size {batch} does not fit in the memory of cuda:0" in text, text
    match = re.search(r"batch size (\d+) fits \(tried\)", text)
    assert match, text
    return int(match.group(1))


def test_a_batch_too_large_for_the_gpu_names_one_that_fits(saved: Path, small_gpu: int) -> None:
    batch = 65536  # far beyond 512 MiB for a training step (and for inference) of this card
    model = registry.load(saved, device="cuda")
    trainer = model.backend.trainer(model.native, model.card, TrainSpec(learning_rate=0.01), Distributed())
    before = {n: p.detach().cpu().clone() for n, p in model.native.named_parameters()}
    x, y = images(batch), np.arange(batch) % 4
    with pytest.raises(DeviceError) as caught:
        trainer.train_step(x, y)
    fits = suggested(caught.value, batch)
    assert 1 <= fits < batch  # and nothing was updated (batch-norm statistics may be, by the failed step itself)
    assert all(torch.equal(before[n], p.detach().cpu()) for n, p in model.native.named_parameters())
    assert np.isfinite(trainer.train_step(x[:fits], y[:fits]).losses["loss"])  # the suggestion really fits
    with pytest.raises(DeviceError) as caught:
        model.reconstruct(x, batch_size=batch)
    fits = suggested(caught.value, batch)
    assert model.reconstruct(x[:fits], batch_size=fits).shape == (fits, 32, 32, 1)


HOROVOD_SCRIPT = r'''
import sys

import numpy as np
import torch
import horovod.torch as hvd

from deepgalaxy import registry
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.specs import TrainSpec
from deepgalaxy.runs.placement import placed

hvd.init()
model = registry.load(sys.argv[1], device="cpu")
train = placed(model, TrainSpec(learning_rate=0.01, device="auto"), local_rank=hvd.local_rank())
trainer = model.backend.trainer(model.native, model.card, train, Distributed(hvd.rank(), hvd.size(), hvd.local_rank()))
expected = f"cuda:{hvd.local_rank()}"
assert train.device == model.device == expected, (train.device, expected)
assert torch.cuda.current_device() == hvd.local_rank(), torch.cuda.current_device()
assert {str(p.device) for p in model.native.parameters()} == {expected}
rng = np.random.default_rng(hvd.rank())
res = trainer.train_step(rng.random((8, 32, 32, 1), dtype=np.float32), np.arange(8) % 4)
assert np.isfinite(res.losses["loss"])
print(f"rank {hvd.rank()} on {expected}")
'''


@pytest.mark.horovod
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="Horovod local-rank pinning needs 2 GPUs")
def test_horovod_pins_each_rank_to_its_local_gpu(saved: Path, tmp_path: Path) -> None:
    pytest.importorskip("horovod.torch")
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    if not Path(horovodrun).exists():
        pytest.skip("horovodrun is not installed")
    script = tmp_path / "pin.py"
    script.write_text(HOROVOD_SCRIPT)
    r = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script),
                        str(saved)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rank 0 on cuda:0" in r.stdout and "rank 1 on cuda:1" in r.stdout, r.stdout
