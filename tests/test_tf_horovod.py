"""Two Horovod workers (horovodrun, Gloo) train the TensorFlow plugin's model and end with identical weights.

Each rank builds its model from a *different* seed and trains on different batches: only the broadcast of rank 0's
initial variables and the allreduced gradients (``hvd.DistributedGradientTape``) can make the ranks agree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = [pytest.mark.horovod, pytest.mark.slow]

HOROVODRUN = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")

WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path

    import horovod.tensorflow as hvd
    import numpy as np
    from safetensors.numpy import save_file

    from deepgalaxy import registry
    from deepgalaxy.core.interfaces import Distributed
    from deepgalaxy.core.specs import TrainSpec, with_overrides

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    out = Path(sys.argv[1])
    card = with_overrides(registry.card("full-simple"), {
        "input_size": 32, "backbone.options.widths": [8, 16], "head_hidden": [16], "decoder_channels": [16, 8],
        "num_classes": 5})
    fw = registry.get_framework("tensorflow")
    native = registry.create(card, "tensorflow", seed=100 + rank).native  # different initial weights per rank
    save_file(fw.get_weights(native), str(out / f"initial{rank}.safetensors"))
    trainer = fw.trainer(native, card, TrainSpec(optimizer="adam", learning_rate=1e-3, grad_clip=5.0),
                         Distributed(rank=rank, size=size, local_rank=hvd.local_rank()))
    assert abs(trainer.learning_rate - 1e-3 * size) < 1e-12, trainer.learning_rate
    rng = np.random.default_rng(rank)  # different data per rank
    for _ in range(3):
        res = trainer.train_step(rng.random((4, 32, 32, 1)).astype(np.float32), rng.integers(0, 5, 4))
    save_file(fw.get_weights(native), str(out / f"final{rank}.safetensors"))
    trainer.save_checkpoint(out / f"ckpt{rank}")  # only rank 0 writes
    print(f"rank {rank} of {size} done, loss {res.losses['loss']:.4f}")
''')


@pytest.mark.skipif(not Path(HOROVODRUN).exists(), reason="horovodrun is not installed")
def test_two_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 of 2 done" in proc.stdout and "rank 1 of 2 done" in proc.stdout

    initial = [load_file(str(tmp_path / f"initial{r}.safetensors")) for r in (0, 1)]
    final = [load_file(str(tmp_path / f"final{r}.safetensors")) for r in (0, 1)]
    kernel = "encoder.blocks.0.conv1.kernel"
    assert not np.array_equal(initial[0][kernel], initial[1][kernel])  # the ranks really started apart
    assert set(final[0]) == set(final[1])
    for name in final[0]:
        if "moving_" in name:
            continue  # batch-norm statistics follow each rank's own batches (as in torch, they are not allreduced)
        np.testing.assert_allclose(final[1][name], final[0][name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert any(not np.array_equal(final[0][n], initial[0][n]) for n in final[0])  # and they trained
    assert (tmp_path / "ckpt0" / "trainer.json").is_file()
    assert not (tmp_path / "ckpt1").exists()
