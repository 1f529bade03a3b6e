"""Torch and TensorFlow build the same architecture: torch weights loaded into the TensorFlow plugin (through the
shared converter) give the same logits, latent means and reconstructions, and convert back bit-exactly.

This is what makes the EfficientNet padding (Keras' ``correct_pad``), the NHWC flatten of the head and the VAE,
and the batch-norm settings matter: any mismatch shows up here as a large difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorflow")

from deepgalaxy import registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full-simple", "full-b0", "full-r18"])
def test_torch_weights_run_identically_in_tensorflow(name: str, tmp_path: Path) -> None:
    if "tensorflow" not in registry.frameworks():
        pytest.skip("the tensorflow framework plugin is not available")
    card = registry.card(name).model_copy(update={"input_size": 64})
    model = registry.create(card, framework="torch", seed=0)
    with torch.no_grad():  # non-trivial batch-norm statistics, so their mapping is tested too
        gen = torch.Generator().manual_seed(0)
        for module in model.native.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=gen) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    model.save(tmp_path / "torch")
    tf_model = registry.load(tmp_path / "torch", framework="tensorflow")
    assert tf_model.framework == "tensorflow"

    x = np.random.default_rng(0).random((2, 64, 64, card.channels), dtype=np.float32)
    z = np.random.default_rng(1).normal(size=(2, card.latent_dim)).astype(np.float32)
    tfw, tw = registry.get_framework("tensorflow"), registry.get_framework("torch")
    for op, data in (("logits", x), ("encode", x), ("reconstruct", x), ("decode", z)):
        ours, theirs = tw.infer(model.native, op, data), tfw.infer(tf_model.native, op, data)
        assert ours.shape == theirs.shape, op
        # fp32 rounding gives ~1e-7 relative; a shifted stride-2 padding in EfficientNet gives ~2e-4
        relative = float(np.abs(ours - theirs).max()) / float(np.abs(ours).max())
        assert relative < 2e-5, (op, relative)

    tf_model.save(tmp_path / "tf")
    back = registry.load(tmp_path / "tf", framework="torch")
    before, after = model.get_weights(), back.get_weights()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
