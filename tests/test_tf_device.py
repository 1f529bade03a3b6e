"""Where the TensorFlow plugin runs: a model placed on a device keeps its variables there and runs its inference and
training ops there, in fp32 or bf16; fp16 is refused on the CPU; the train CLI takes ``train.device``.

This machine has no GPU: a second logical CPU (``/CPU:1``, in a fresh interpreter) stands in for a device other
than the one the model was built on. The GPU cases are in ``test_tf_gpu.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.device import Accelerator, resolve_device
from deepgalaxy.core.errors import DeviceError
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.specs import ModelSpec, TrainSpec, with_overrides
from tests.runs_support import CARD, TINY, cli, make_dataset

pytest.importorskip("tensorflow")

SMALL = {"input_size": 32, "backbone.options.widths": [8, 16], "head_hidden": [16], "decoder_channels": [16, 8],
         "num_classes": 5}
REPO = Path(__file__).resolve().parents[1]


def small() -> ModelSpec:
    return with_overrides(registry.card("full-simple"), SMALL)


def batch(n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 32, 32, 1)).astype(np.float32), (np.arange(n) % 5).astype(np.int64)


def test_a_model_loaded_on_the_cpu_infers_and_trains_there(tmp_path: Path) -> None:
    registry.create(small(), framework="tensorflow", seed=0).save(tmp_path / "m")
    model = registry.load(tmp_path / "m", device="cpu")
    fw, native = model.backend, model.native
    assert model.device == "cpu" and native.run_device == "/CPU:0"
    assert all(v.value.device.endswith("CPU:0") for v in native.variables)
    x, y = batch()
    for _ in range(3):  # eager calls, then the traced graph
        out = fw.infer_tensor(native, "logits", x)
        assert out.device.endswith("CPU:0"), out.device
    weights = fw.get_weights(native)
    model.to("cpu")  # already there: nothing moves, nothing changes
    assert all(np.array_equal(weights[k], v) for k, v in fw.get_weights(native).items())
    trainer = fw.trainer(native, model.card, TrainSpec(optimizer="adam", device="cpu"), Distributed())
    report = trainer.run("train", x, y)
    assert report["loss"].device.endswith("CPU:0") and np.isfinite(report["loss"].numpy())
    assert all(v.value.device.endswith("CPU:0") for v in trainer.optimizer.variables)
    assert trainer.run("eval", x, y)["loss"].device.endswith("CPU:0")


def test_bf16_trains_and_infers_close_to_fp32() -> None:
    x, y = batch(8)
    losses, outputs = {}, {}
    for precision in ("fp32", "bf16"):
        model = registry.create(small(), framework="tensorflow", seed=0)
        with warnings.catch_warnings():  # where this CPU emulates bf16, Model.to warns with its cost
            warnings.simplefilter("ignore", RuntimeWarning)
            model.to("cpu", precision)
        outputs[precision] = model.predict(x).probabilities
        train = TrainSpec(optimizer="adam", learning_rate=1e-3, device="cpu", precision=precision)
        trainer = model.backend.trainer(model.native, model.card, train, Distributed())
        assert trainer.precision == precision
        before = model.get_weights()
        losses[precision] = trainer.train_step(x, y).losses["loss"]  # from the same weights in both
        second = trainer.train_step(x, y).losses["loss"]
        assert np.isfinite(second) and any(not np.array_equal(before[k], v) for k, v in model.get_weights().items())
    assert not np.array_equal(outputs["fp32"], outputs["bf16"])  # really computed in bf16
    np.testing.assert_allclose(outputs["bf16"], outputs["fp32"], atol=0.03)
    assert losses["fp32"] != losses["bf16"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)


def test_fp16_is_refused_on_the_cpu() -> None:
    model = registry.create(small(), framework="tensorflow", seed=0)
    with pytest.raises(DeviceError, match="fp16"):
        model.to("cpu", "fp16")
    x, _ = batch()
    with pytest.raises(DeviceError, match=r"fp16.*CPU"):  # the plugin's own guard, for callers that skip the core
        model.backend.infer(model.native, "logits", x, precision="fp16")
    with pytest.raises(DeviceError, match="fp16"):
        model.backend.trainer(model.native, model.card, TrainSpec(device="cpu", precision="fp16"), Distributed())


def test_auto_after_pinning_is_the_one_visible_gpu() -> None:
    # a Horovod rank that pinned its GPU sees one, as cuda:0, whatever its local rank
    pinned = [Accelerator(0, "the rank's GPU", bf16=True)]
    assert [resolve_device("auto", pinned, rank) for rank in range(4)] == ["cuda:0"] * 4


PLACEMENT = textwrap.dedent('''
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from deepgalaxy import registry
    from deepgalaxy.core.interfaces import Distributed
    from deepgalaxy.core.specs import TrainSpec, with_overrides
    from deepgalaxy.plugins.tensorflow import devices

    def on(tensors, device):
        return all(t.device.endswith(device) for t in tensors)

    card = with_overrides(registry.card("full-simple"), {SMALL!r})
    model = registry.create(card, framework="tensorflow", seed=0)
    fw, native = model.backend, model.native
    x = np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32)
    y = np.arange(4) % 5
    before = fw.get_weights(native)
    reference = fw.infer(native, "logits", x)
    assert on([v.value for v in native.variables], "CPU:0")

    home = devices.tf_device
    devices.tf_device = lambda device: "/CPU:1"  # "cpu" is now the second logical CPU, a device of its own
    model.to("cpu")
    assert on([v.value for v in native.variables], "CPU:1"), "variables not moved"
    assert all(np.array_equal(before[k], v) for k, v in fw.get_weights(native).items()), "values changed"
    for _ in range(3):  # eager calls, then the traced graph
        out = fw.infer_tensor(native, "logits", x)
        assert on([out], "CPU:1"), out.device
        np.testing.assert_allclose(out.numpy(), reference, rtol=1e-6, atol=1e-6)
    trainer = fw.trainer(native, card, TrainSpec(optimizer="adam", device="cpu"), Distributed())
    report = trainer.run("train", x, y)
    assert on(report.values(), "CPU:1"), [t.device for t in report.values()]
    assert on([v.value for v in trainer.optimizer.variables], "CPU:1"), "optimizer variables elsewhere"
    assert on([v.value for v in native.variables], "CPU:1"), "variables moved back by the step"
    trained = fw.get_weights(native)
    assert any(not np.array_equal(before[k], trained[k]) for k in before), "the step did not train"

    devices.tf_device = home
    model.to("cpu")  # and back to /CPU:0: the trained weights come along
    assert on([v.value for v in native.variables], "CPU:0")
    assert all(np.array_equal(trained[k], v) for k, v in fw.get_weights(native).items())
    assert on([fw.infer_tensor(native, "logits", x)], "CPU:0")
    print("placement ok")
''').replace("{SMALL!r}", repr(SMALL))


def test_a_model_moved_to_another_device_keeps_its_weights_and_runs_there(tmp_path: Path) -> None:
    script = tmp_path / "placement.py"
    script.write_text(PLACEMENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "placement ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_train_cli_runs_tensorflow_on_the_device_asked_for(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "tiny.zarr")
    common = ["train", CARD, "--framework", "tensorflow", "--data", str(data), "--epochs", "1", "--no-register",
              *[x for s in [*TINY, "train.max_steps_per_epoch=2"] for x in ("--set", s)]]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = cli(*common, "--set", "train.device=cpu", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    bad = cli(*common, "--set", "train.device=cpu", "--set", "train.precision=fp16", "--run-dir",
              str(tmp_path / "fp16"), cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "fp16" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]
