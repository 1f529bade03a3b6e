"""Dihedral augmentation: label-preserving symmetries, deterministic per key."""

import numpy as np
import pytest

from deepgalaxy.core.augment import augment, dihedral


def test_each_image_gets_one_of_the_eight_symmetries() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1)).astype(np.float32)
    y = dihedral(x, np.random.default_rng(1))
    seen = set()
    for a, b in zip(x, y, strict=True):
        matches = [k for k in range(8)
                   if np.array_equal(b, (np.rot90(a, k % 4)[:, ::-1] if k >= 4 else np.rot90(a, k % 4)))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))  # 64 draws cover all 8 with overwhelming probability for this seed
    assert np.isclose(x.sum(), y.sum())


def test_augment_is_keyed_and_none_is_identity() -> None:
    x = np.random.default_rng(0).random((16, 4, 4, 1)).astype(np.float32)
    assert augment(x, "none", 0, 1, 2) is x
    assert np.array_equal(augment(x, "dihedral", 0, 3, 5), augment(x, "dihedral", 0, 3, 5))
    assert not np.array_equal(augment(x, "dihedral", 0, 3, 5), augment(x, "dihedral", 0, 3, 6))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="square"):
        dihedral(np.zeros((2, 4, 6, 1)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="dihedral"):
        augment(np.zeros((2, 4, 4, 1)), "mixup", 0)
