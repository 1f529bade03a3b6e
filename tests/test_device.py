"""Devices and precision on the CPU (issue 18): device and precision selection against real Accelerator lists and
CpuInfo records, inference and training steps in fp32, bf16 and auto through ``registry.load`` / ``Model.to`` and the
torch trainer, the train CLI with ``--device`` / ``--precision`` (hardware tags on its MLflow run, a resumed run
moved to another device), and bad devices refused at the CLI in one line before anything is written."""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepgalaxy import registry  # noqa: E402
from deepgalaxy.cli import app  # noqa: E402
from deepgalaxy.cli.common import run_cli  # noqa: E402
from deepgalaxy.core.device import Accelerator, batch_too_large, resolve_device, resolve_precision  # noqa: E402
from deepgalaxy.core.errors import DeviceError  # noqa: E402
from deepgalaxy.core.hardware import CpuInfo, cpu_info, hardware_tags  # noqa: E402
from deepgalaxy.core.interfaces import Distributed  # noqa: E402
from deepgalaxy.core.specs import TrainSpec, with_overrides  # noqa: E402
from deepgalaxy.plugins.torch import devices  # noqa: E402
from deepgalaxy.plugins.torch.tensors import autocast  # noqa: E402
from deepgalaxy.runs.rundir import RUN_FILE, read_run_spec  # noqa: E402
from deepgalaxy.runs.training import build_spec  # noqa: E402
from tests.runs_support import CARD, TINY, make_dataset, mlflow_runs  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

GPUS = [Accelerator(0, "Tesla V100", 16 * 2**30, bf16=False), Accelerator(1, "A100", 80 * 2**30, bf16=True)]
"""Two GPUs as a framework reports them: an old one without native bf16 and a newer one with it."""
NATIVE = frozenset({"avx2", "avx512f", "avx512_bf16"})
NATIVE_BF16 = "bf16" if cpu_info().native_bf16 else "fp32"
"""What ``auto`` resolves to on this machine's CPU."""
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors where no GPU is visible")


def cpu(flags: frozenset[str] = frozenset({"avx2", "fma"})) -> CpuInfo:
    """A CPU of its own name (the emulation warning is once per CPU model and process)."""
    return CpuInfo(f"Test CPU {uuid.uuid4().hex[:8]}", 4, flags)


# --- selection (pure logic on real records) --------------------------------------------------------------------


def test_device_selection_against_the_visible_gpus() -> None:
    assert resolve_device("auto", []) == "cpu" and resolve_device("cpu", GPUS) == "cpu"
    assert resolve_device("auto", GPUS) == "cuda:0" and resolve_device("CUDA", GPUS, local_rank=1) == "cuda:1"
    assert resolve_device("auto", GPUS, local_rank=3) == "cuda:1"  # a rank per GPU, wrapping round
    assert resolve_device("cuda:1", GPUS, local_rank=0) == "cuda:1"  # an explicit index is every rank's
    with pytest.raises(DeviceError, match=r"'cuda:3'.*only 2 GPU\(s\).*cuda:1 \(A100, 80 GiB\)"):
        resolve_device("cuda:3", GPUS)
    with pytest.raises(DeviceError, match="'cuda': no GPU is visible"):
        resolve_device("cuda", [])
    with pytest.raises(DeviceError, match=r"'gpu' is not a device: use auto, cpu, cuda or cuda:N.*NVIDIA"):
        resolve_device("gpu", GPUS)


def test_precision_follows_what_the_hardware_does_natively() -> None:
    assert resolve_precision("auto", "cuda:1", GPUS) == "bf16"
    assert resolve_precision("auto", "cuda:0", GPUS) == "fp32"  # no native bf16 on that GPU
    assert resolve_precision("fp16", "cuda:0", GPUS) == "fp16"
    assert resolve_precision("auto", "cpu", GPUS, cpu(NATIVE)) == "bf16"
    assert resolve_precision("auto", "cpu", [], cpu()) == "fp32"
    assert resolve_precision("fp32", "cpu", [], cpu()) == "fp32"
    with pytest.raises(DeviceError, match="precision 'fp16' needs a GPU"):
        resolve_precision("fp16", "cpu", GPUS, cpu(NATIVE))
    with pytest.raises(DeviceError, match="'fp8' is not a precision"):
        resolve_precision("fp8", "cpu")


def test_bf16_where_emulated_warns_once_with_its_measured_cost() -> None:
    measured: list[float] = []

    def slowdown() -> float:
        measured.append(devices.bf16_slowdown())  # the real measurement on this CPU
        return measured[-1]

    emulating = cpu()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", "cpu", [], emulating, slowdown) == "bf16"
        assert resolve_precision("bf16", "cpu", [], emulating, slowdown) == "bf16"
        assert resolve_precision("bf16", "cpu", [], cpu(NATIVE), slowdown) == "bf16"  # native: no warning
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1 and len(measured) == 1, said
    assert f"measured here: {measured[0]:.1f}x the time of fp32" in said[0] and emulating.model in said[0], said[0]
    assert measured[0] > 0


def test_batch_too_large_names_the_batch_and_the_largest_halved_one_that_fits() -> None:
    tried: list[int] = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n * 3 <= 100  # 33 images fit

    error = batch_too_large(100, "cuda:0", fits, "a training step")
    assert tried == [50, 25]
    assert str(error).startswith("a training step with batch size 100 does not fit in the memory of cuda:0; batch "
                                 "size 25 fits (tried)")
    assert "--batch-size 25" in str(error) and "--set train.batch_size=25" in str(error)
    nothing = batch_too_large(4, "cuda:1", lambda n: False, "inference (logits)")
    assert "batch size 4" in str(nothing) and "not even one image fits" in str(nothing)


# --- inference and training steps on the CPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = with_overrides(registry.card(CARD), {"input_size": 32, "backbone.options.widths": [8, 16],
                                                "decoder_channels": [16, 8], "head_hidden": [16]})
    return registry.create(card, framework="torch", seed=1).save(tmp_path_factory.mktemp("model") / "m")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 1), dtype=np.float32)


def test_inference_on_the_cpu_in_each_precision(saved: Path) -> None:
    x = images(6)
    fp32 = registry.load(saved, device="cpu")
    assert (fp32.device, fp32.precision) == ("cpu", "fp32")
    bf16 = registry.load(saved, device="cpu", precision="bf16")
    assert (bf16.device, bf16.precision) == ("cpu", "bf16")
    auto = registry.load(saved, device="auto", precision="auto")
    assert (auto.device, auto.precision) == ("cpu", NATIVE_BF16)
    p32, p16 = fp32.predict(x).probabilities, bf16.predict(x).probabilities
    assert p32.dtype == p16.dtype == np.float32
    np.testing.assert_allclose(p16, p32, atol=0.05)
    z32, z16 = fp32.encode(x), bf16.encode(x)
    assert z16.dtype == np.float32 and not np.array_equal(z16, z32)  # bf16 really ran
    np.testing.assert_allclose(z16, z32, atol=0.1)
    assert fp32.predict(x, precision="bf16").probabilities.tolist() == p16.tolist()  # per call: the same path
    back = fp32.to("cpu", "fp32")
    assert back is fp32 and back.reconstruct(x).dtype == np.float32


@NO_GPU
def test_a_gpu_where_none_is_visible_is_an_error_not_a_cpu_run(saved: Path) -> None:
    with pytest.raises(DeviceError, match="no GPU is visible"):
        registry.load(saved, device="cuda")
    with pytest.raises(DeviceError, match="precision 'fp16' needs a GPU"):
        registry.load(saved, device="auto", precision="fp16")
    with pytest.raises(ValueError, match="fp16 only on cuda"), autocast("fp16", "cpu"):
        pass


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_training_steps_on_the_cpu(saved: Path, precision: str) -> None:
    model = registry.load(saved, device="cpu")
    before = model.get_weights()
    train = TrainSpec(batch_size=4, learning_rate=0.01, precision=precision, device="cpu")  # type: ignore[arg-type]
    trainer = model.backend.trainer(model.native, model.card, train, Distributed())
    assert trainer.precision == (NATIVE_BF16 if precision == "auto" else precision)
    assert str(trainer.device) == "cpu" and trainer.scaler is None
    x, y = (images(4, seed=2) * 255).astype(np.uint8).astype(np.float32) / 255, np.array([0, 1, 2, 3])
    for _ in range(2):
        res = trainer.train_step(x, y)
        assert np.isfinite(res.losses["loss"]) and res.predicted is not None and res.predicted.shape == (4,)
    after = model.get_weights()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay fp32 under mixed precision


def test_the_out_of_memory_probe_changes_nothing(saved: Path) -> None:
    """What a trainer runs to find a batch that fits after running out of GPU memory (the same forward and
    backward) leaves weights, batch-norm statistics and gradients as they were; here on the CPU."""
    model = registry.load(saved, device="cpu")
    trainer = model.backend.trainer(model.native, model.card, TrainSpec(learning_rate=0.01), Distributed())
    trainer.train_step(images(4, seed=3), np.arange(4))
    trainer.optimizer.zero_grad()
    before = model.get_weights()
    trainer._probe(images(2, seed=4), np.arange(2))
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.native.parameters())


@NO_GPU
def test_a_trainer_refuses_fp16_on_the_cpu(saved: Path) -> None:
    model = registry.load(saved, device="cpu")
    with pytest.raises(DeviceError, match="fp16"):
        model.backend.trainer(model.native, model.card, TrainSpec(precision="fp16"), Distributed())


# --- the CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny.zarr")


def invoke(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = run_cli(app, [str(a) for a in args])
    return (0 if rc is None else int(rc)), capsys.readouterr().err


def settings(steps: int = 2) -> list[str]:
    return [a for o in [*TINY, f"train.max_steps_per_epoch={steps}"] for a in ("--set", o)]


BAD = [(["--device", "gpu"], "'gpu'"), (["--precision", "fp64"], "'fp64'")]
NO_GPU_BAD = [(["--device", "cuda:3"], "'cuda:3'"), (["--device", "cuda"], "'cuda'"),
              (["--precision", "fp16"], "'fp16'"), (["--device", "cpu", "--precision", "fp16"], "'fp16'")]


@pytest.mark.parametrize(("flags", "names"), [*BAD, *[pytest.param(*c, marks=NO_GPU) for c in NO_GPU_BAD]],
                         ids=[" ".join(f) for f, _ in [*BAD, *NO_GPU_BAD]])
@pytest.mark.parametrize("command", ["train", "tune", "scale"])
def test_a_bad_device_or_precision_is_one_line_and_writes_nothing(
        command: str, flags: list[str], names: str, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPGALAXY_RUNS_DIR", str(tmp_path / "runs"))
    db = tmp_path / "mlflow.db"
    extra = {"train": ["--run-dir", tmp_path / "run"], "tune": ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                                                                "--run-dir", tmp_path / "run"],
             "scale": ["--workers", "1", "--run-dir", tmp_path / "run"]}[command]
    args = [command, CARD, "--data", data, *settings(), "--tracking-uri", f"sqlite:///{db}", *extra, *flags]
    rc, err = invoke(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written: no run dir, no MLflow store"


@NO_GPU
@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--device", "gpu"], ["--precision", "fp16"]])
def test_serve_refuses_a_bad_device_in_one_line(flags: list[str], saved: Path, data: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = invoke(["serve", saved, "--data", data, "--port", "0", "--no-progress", *flags], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flags[1] in lines[0], err


@pytest.mark.slow
def test_train_cli_on_the_cpu_in_bf16_tags_the_hardware(data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, err = invoke(["train", CARD, "--data", data, "--epochs", "1", *settings(), "--tracking-uri", uri,
                      "--run-dir", tmp_path / "run", "--no-progress", "--no-register", "--device", "cpu",
                      "--precision", "bf16"], capsys)
    assert rc == 0, err
    assert read_run_spec(tmp_path / "run").train.precision == "bf16"
    [run] = mlflow_runs(uri)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("hardware.")}
    assert tags == hardware_tags("cpu", "bf16", cpu=cpu_info())
    assert tags["hardware.cpu"] == cpu_info().model and tags["hardware.cpu_cores"] == str(cpu_info().cores)
    assert run.data.params["train.precision"] == "bf16" and run.data.params["train.device"] == "cpu"


@pytest.mark.slow
@NO_GPU
def test_a_run_made_for_a_gpu_resumes_on_the_cpu(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    """A run whose spec asks for cuda (started on a GPU machine) continues here with --device: weights and
    checkpoints are device-independent; without --device it is refused before anything is launched."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = build_spec(CARD, data, epochs=1, overrides=[*TINY, "train.max_steps_per_epoch=2"], tracking_uri=uri,
                      register=False, device="cuda", precision="auto")
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text(spec.model_copy(update={"checkpoint_dir": str(run)}).model_dump_json())
    rc, err = invoke(["train", "--resume", "--run-dir", run, "--no-progress"], capsys)
    assert rc == 2 and "'cuda': no GPU is visible" in err and sorted(p.name for p in run.iterdir()) == [RUN_FILE]
    rc, err = invoke(["train", "--resume", "--run-dir", run, "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    moved = read_run_spec(run).train
    assert (moved.device, moved.precision) == ("cpu", "auto")  # what was asked; the tags say what it resolved to
    [mlflow_run] = mlflow_runs(uri)
    assert mlflow_run.data.tags["hardware.precision"] == NATIVE_BF16
    assert json.loads((run / "result.json").read_text())["epochs"] == 1
