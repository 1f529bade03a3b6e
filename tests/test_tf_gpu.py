"""The TensorFlow plugin on a GPU: training steps in fp32, bf16 and fp16 (loss scale kept across checkpoints),
placement, a CPU-trained model loaded on the GPU and back, out-of-memory errors naming a batch that fits, and Horovod
ranks pinning the GPU of their local rank. Skipped where TensorFlow sees no GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from deepgalaxy import registry  # noqa: E402
from deepgalaxy.core.interfaces import Distributed  # noqa: E402
from deepgalaxy.core.specs import ModelSpec, TrainSpec, with_overrides  # noqa: E402

GPUS = tf.config.list_physical_devices("GPU")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPUS, reason="TensorFlow sees no GPU here")]

SMALL = {"input_size": 32, "backbone.options.widths": [8, 16], "head_hidden": [16], "decoder_channels": [16, 8],
         "num_classes": 5}
REPO = Path(__file__).resolve().parents[1]
HOROVODRUN = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")


def adam(**train: str) -> TrainSpec:
    return TrainSpec(optimizer="adam", learning_rate=1e-3, **train)


def small() -> ModelSpec:
    return with_overrides(registry.card("full-simple"), SMALL)


def batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 32, 32, 1)).astype(np.float32), (np.arange(n) % 5).astype(np.int64)


def bf16_native() -> bool:
    return tuple(tf.config.experimental.get_device_details(GPUS[0]).get("compute_capability", (0, 0))) >= (8, 0)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_run_on_the_gpu(precision: str, tmp_path: Path) -> None:
    if precision == "bf16" and not bf16_native():
        pytest.skip("bf16 needs compute capability 8.0 (Ampere) or later")
    model = registry.create(small(), framework="tensorflow", seed=0)
    fw, native = model.backend, model.native
    trainer = fw.trainer(native, model.card, adam(device="cuda:0", precision=precision), Distributed())
    assert (trainer.device, trainer.precision) == ("cuda:0", precision)
    assert all(v.value.device.endswith("GPU:0") for v in native.variables)
    assert all(v.value.device.endswith("GPU:0") for v in trainer.optimizer.variables)
    x, y = batch()
    before = fw.get_weights(native)
    report = trainer.run("train", x, y)
    assert report["loss"].device.endswith("GPU:0") and np.isfinite(report["loss"].numpy())
    assert all(np.isfinite(trainer.train_step(x, y).losses["loss"]) for _ in range(5))
    after = fw.get_weights(native)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert fw.get_weights(native)["encoder.blocks.0.conv1.kernel"].dtype == np.float32  # variables stay fp32

    trainer.save_checkpoint(tmp_path / "ckpt")
    state = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    assert ("loss_scale" in state) == (precision == "fp16")
    resumed = fw.trainer(registry.create(small(), framework="tensorflow", seed=1).native, model.card,
                         adam(device="cuda:0", precision=precision), Distributed())
    resumed.load_checkpoint(tmp_path / "ckpt")
    if precision == "fp16":
        assert float(resumed.optimizer.dynamic_scale.numpy()) == state["loss_scale"]["scale"]
        assert int(resumed.optimizer.step_counter.numpy()) == state["loss_scale"]["steps_since_change"]
    a, b = trainer.train_step(x, y).losses["loss"], resumed.train_step(x, y).losses["loss"]
    assert a == pytest.approx(b, rel=1e-3)


def test_fp16_and_bf16_inference_is_close_to_fp32() -> None:
    model = registry.create(small(), framework="tensorflow", seed=0).to("cuda:0")
    x, _ = batch()
    reference = model.predict(x).probabilities
    for precision in ("fp16", "bf16") if bf16_native() else ("fp16",):
        out = model.backend.infer_tensor(model.native, "logits", x, precision)
        assert out.device.endswith("GPU:0") and out.dtype == tf.float32
        assert np.allclose(model.predict(x, precision=precision).probabilities, reference, atol=0.03)


def test_a_cpu_trained_model_loads_on_the_gpu_and_back(tmp_path: Path) -> None:
    model = registry.create(small(), framework="tensorflow", seed=0).to("cpu")
    trainer = model.backend.trainer(model.native, model.card, adam(device="cpu"), Distributed())
    x, y = batch()
    for _ in range(3):
        trainer.train_step(x, y)
    assert all(v.value.device.endswith("CPU:0") for v in model.native.variables)
    model.save(tmp_path / "m")
    on_cpu = model.predict(x).probabilities

    gpu = registry.load(tmp_path / "m", device="cuda:0")
    assert gpu.device == "cuda:0" and all(v.value.device.endswith("GPU:0") for v in gpu.native.variables)
    assert gpu.backend.infer_tensor(gpu.native, "logits", x).device.endswith("GPU:0")
    np.testing.assert_allclose(gpu.predict(x).probabilities, on_cpu, atol=2e-3)  # TF32 convolutions on Ampere on
    weights = gpu.get_weights()
    gpu.to("cpu")
    assert all(v.value.device.endswith("CPU:0") for v in gpu.native.variables)
    assert all(np.array_equal(weights[k], v) for k, v in gpu.get_weights().items())
    np.testing.assert_allclose(gpu.predict(x).probabilities, on_cpu, rtol=1e-5, atol=1e-6)


OUT_OF_MEMORY = textwrap.dedent('''
    import re

    import numpy as np
    import tensorflow as tf

    gpu = tf.config.list_physical_devices("GPU")[0]
    tf.config.set_visible_devices(gpu, "GPU")
    tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=1024)])

    from deepgalaxy import registry
    from deepgalaxy.core.errors import DeviceError
    from deepgalaxy.core.interfaces import Distributed
    from deepgalaxy.core.specs import TrainSpec, with_overrides

    card = with_overrides(registry.card("full-simple"), {"input_size": 128, "backbone.options.widths": [64, 128],
                                                          "head_hidden": [16], "decoder_channels": [64, 32]})
    model = registry.create(card, framework="tensorflow", seed=0).to("cuda:0")
    x = np.random.default_rng(0).random((4096, 128, 128, 1)).astype(np.float32)
    for what, run in [
            ("inference", lambda n: model.backend.infer(model.native, "logits", x[:n])),
            ("train", lambda n: model.backend.trainer(model.native, card, TrainSpec(device="cuda:0"),
                                                      Distributed()).train_step(x[:n], np.arange(n) % 2)),
    ]:
        n = 4096 if what == "inference" else 1024
        try:
            run(n)
        except DeviceError as exc:
            text = str(exc)
        else:
            raise AssertionError(f"{what}: batch {n} fitted in 1 GiB")
        assert f"batch size {n}" in text and "cuda:0" in text, text
        fits = int(re.search(r"--batch-size (\\d+)", text).group(1))
        assert 1 <= fits < n, text
        run(fits)  # the suggested batch size really fits
        print(what, "ok:", text)
''')


def test_out_of_gpu_memory_names_a_batch_size_that_fits(tmp_path: Path) -> None:
    script = tmp_path / "oom.py"
    script.write_text(OUT_OF_MEMORY)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "inference ok" in proc.stdout and "train ok" in proc.stdout


PINNING = textwrap.dedent('''
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    hvd.init()
    from deepgalaxy.plugins.tensorflow.runtime import TensorFlowRuntime

    TensorFlowRuntime()  # what the launcher's collective builds in each rank, before any TensorFlow op
    from deepgalaxy import registry
    from deepgalaxy.core.device import resolve_device
    from deepgalaxy.core.interfaces import Distributed
    from deepgalaxy.core.specs import TrainSpec, with_overrides
    from deepgalaxy.plugins.tensorflow.devices import accelerators

    rank, local = hvd.rank(), hvd.local_rank()
    physical = tf.config.list_physical_devices("GPU")
    visible = tf.config.get_visible_devices("GPU")
    assert visible == [physical[local % len(physical)]], (visible, physical)
    assert tf.config.experimental.get_memory_growth(visible[0])
    assert len(tf.config.list_logical_devices("GPU")) == 1
    assert resolve_device("auto", accelerators(), local) == "cuda:0"
    card = with_overrides(registry.card("full-simple"), {SMALL!r})
    native = registry.create(card, "tensorflow", seed=rank).native
    trainer = registry.get_framework("tensorflow").trainer(
        native, card, TrainSpec(optimizer="adam", learning_rate=1e-3),
        Distributed(rank=rank, size=hvd.size(), local_rank=local))
    assert trainer.device == "cuda:0"
    rng = np.random.default_rng(rank)
    report = trainer.run("train", rng.random((4, 32, 32, 1)).astype(np.float32), np.arange(4) % 5)
    assert report["loss"].device.endswith("GPU:0")
    print(f"rank {rank} pinned {visible[0].name}")
''').replace("{SMALL!r}", repr(SMALL))


@pytest.mark.horovod
@pytest.mark.skipif(len(GPUS) < 2, reason="pinning one GPU per rank needs 2 GPUs")
@pytest.mark.skipif(not Path(HOROVODRUN).exists(), reason="horovodrun is not installed")
def test_two_horovod_ranks_each_pin_the_gpu_of_their_local_rank(tmp_path: Path) -> None:
    script = tmp_path / "pin.py"
    script.write_text(PINNING)
    proc = subprocess.run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 pinned /physical_device:GPU:0" in proc.stdout
    assert "rank 1 pinned /physical_device:GPU:1" in proc.stdout
