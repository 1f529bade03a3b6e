"""The torch trainer under Horovod (2 ranks, Gloo): rank 0's weights are broadcast, gradients are averaged so the
ranks stay identical on different data, the learning rate scales with the workers, and only rank 0 writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("horovod.torch")

SCRIPT = r'''
import sys
from pathlib import Path

import numpy as np
import torch
import horovod.torch as hvd

from deepgalaxy import registry
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.specs import BackboneSpec, ModelSpec, TrainSpec

torch.set_num_threads(1)
hvd.init()
rank, size = hvd.rank(), hvd.size()
out = Path(sys.argv[1])
card = ModelSpec(name="hvd-tiny", task="full", backbone=BackboneSpec(name="simple", options={"widths": [8, 16]}),
                 input_size=16, head_hidden=(16,), latent_dim=16, latent_channels=4, decoder_channels=(16, 8))
model = registry.create(card, framework="torch", seed=100 + rank)  # different initial weights on purpose


def flat() -> torch.Tensor:
    """All trainable parameters (batch-norm running statistics are per rank in Horovod: not compared)."""
    return torch.cat([p.detach().double().flatten() for p in model.native.parameters()])


def same_on_all_ranks(v: torch.Tensor) -> bool:
    """Every rank's weights equal rank 0's (the verdict is summed over ranks, so all ranks agree on it)."""
    diff = (hvd.broadcast(v, root_rank=0, name=f"w{same_on_all_ranks.calls}") - v).abs().max().reshape(1)
    return float(hvd.allreduce(diff, op=hvd.Sum, name=f"d{same_on_all_ranks.calls}")) == 0.0


same_on_all_ranks.calls = 0
assert not same_on_all_ranks(flat()), "the ranks should start from different random weights"
same_on_all_ranks.calls += 1
train = TrainSpec(optimizer="adadelta", learning_rate=0.5, grad_clip=5.0, seed=0)
trainer = model.backend.trainer(model.native, card, train, Distributed(rank=rank, size=size))
assert trainer.learning_rate == 0.5 * size, trainer.learning_rate
assert same_on_all_ranks(flat()), "rank 0's weights were not broadcast"
same_on_all_ranks.calls += 1
rng = np.random.default_rng(rank)  # different data on every rank
for step in range(3):
    x = rng.random((4, 16, 16, 1), dtype=np.float32)
    res = trainer.train_step(x, rng.integers(0, 71, 4))
    assert np.isfinite(res.losses["loss"])
assert same_on_all_ranks(flat()), "weights diverged: gradients were not averaged"
trainer.save_checkpoint(out / f"ckpt-rank{rank}")
hvd.allreduce(torch.zeros(1), name="barrier")
print(f"rank {rank} of {size}: OK")
'''


@pytest.mark.slow
@pytest.mark.horovod
def test_two_ranks_stay_identical(tmp_path: Path) -> None:
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    if not Path(horovodrun).exists():
        pytest.skip("horovodrun is not installed")
    script = tmp_path / "hvd_step.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 of 2: OK" in proc.stdout and "rank 1 of 2: OK" in proc.stdout
    assert (tmp_path / "ckpt-rank0" / "trainer.json").is_file()
    assert not (tmp_path / "ckpt-rank1").exists(), "only rank 0 may write checkpoints"
