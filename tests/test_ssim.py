"""SSIM of images and the evaluation of recommendations (top-k vs random floor vs SSIM-oracle ceiling)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from deepgalaxy.core.errors import ShapeError
from deepgalaxy.core.search import LatentIndex
from deepgalaxy.core.ssim import evaluate_index, evaluate_recommendations, ssim, ssim_one_to_many, ssim_pairs


def blobs(n: int = 14, size: int = 24, channels: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images of a Gaussian blob whose position moves with the class, plus a little noise; and the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 7
    yy, xx = np.mgrid[:size, :size]
    images = []
    for c in labels:
        cx = 4 + 2.5 * c + rng.normal(0, 0.3)
        img = np.exp(-((xx - cx) ** 2 + (yy - size / 2) ** 2) / 10.0)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        if channels:
            img = np.stack([img * (0.5 + 0.5 * ch / channels) for ch in range(channels)], axis=-1)
        images.append(img)
    return np.asarray(images), labels


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1), (32, 40, 3)])
def test_ssim_of_image_with_itself_is_one(shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(0).random(shape)
    assert ssim(img, img) == pytest.approx(1.0)
    as_uint8 = (img * 255).astype(np.uint8)
    assert ssim(as_uint8, as_uint8) == pytest.approx(1.0)
    assert ssim(img, np.clip(img + 0.2, 0, 1)) < 0.99


def test_ssim_uses_the_right_data_range() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random((32, 32)) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    want = structural_similarity(a, b, data_range=255)
    assert ssim(a, b) == pytest.approx(want, abs=1e-12)
    assert ssim(a / 255.0, b / 255.0) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_vectorised_ssim_equals_scikit_image(channels: int | None) -> None:
    images, _ = blobs(channels=channels)
    got = ssim_one_to_many(images[0], images, chunk=5)
    for j, value in enumerate(got):
        b = images[j]
        if channels and channels > 1:
            want = structural_similarity(images[0], b, data_range=1.0, channel_axis=2)
        else:
            want = structural_similarity(images[0].squeeze(), b.squeeze(), data_range=1.0)
        assert value == pytest.approx(want, abs=1e-10)
    assert got[0] == pytest.approx(1.0)
    pairs = np.array([[0, 3], [2, 5], [0, 4]])
    np.testing.assert_allclose(ssim_pairs(images, pairs), [got[3], ssim(images[2], images[5]), got[4]], atol=1e-10)


def test_ssim_rejects_bad_images() -> None:
    with pytest.raises(ShapeError, match=r"\[0, 1\]"):
        ssim(np.full((16, 16), 2.0), np.ones((16, 16)))
    with pytest.raises(ShapeError, match="equal shape"):
        ssim(np.ones((16, 16)), np.ones((16, 17)))
    with pytest.raises(ShapeError, match="at least 7x7"):
        ssim(np.ones((5, 5)), np.ones((5, 5)))
    with pytest.raises(ShapeError, match="dtype"):
        ssim(np.ones((16, 16), dtype=np.int32), np.ones((16, 16), dtype=np.int32))


def brute_force_report(images: np.ndarray, queries: np.ndarray, rec: np.ndarray, k: int) -> tuple[float, float]:
    """Mean top-k SSIM and oracle ceiling computed pair by pair with scikit-image."""
    n = len(images)
    full = np.array([[structural_similarity(images[i], images[j], data_range=1.0) for j in range(n)] for i in queries])
    top = np.mean([full[qi, rec[qi]].mean() for qi in range(len(queries))])
    oracle = np.mean([np.sort(np.delete(full[qi], q))[-k:].mean() for qi, q in enumerate(queries)])
    return float(top), float(oracle)


def test_evaluation_matches_brute_force_and_orders_floor_model_ceiling() -> None:
    images, labels = blobs(n=14)
    z = np.stack([labels, np.zeros_like(labels)], axis=1).astype(np.float32)  # latent = the class: a good model
    z += np.random.default_rng(0).normal(0, 0.01, z.shape).astype(np.float32)
    index = LatentIndex.build(z, {"name": "vae-b0", "version": "1"})
    queries = np.arange(14)
    rec, _ = index.recommend(queries, k=3)
    report = evaluate_recommendations(images, queries, rec, labels=labels, pool_size=1000)
    top, oracle = brute_force_report(images, queries, rec, 3)
    assert report.ssim_top_k == pytest.approx(top, abs=1e-10)
    assert report.ssim_oracle == pytest.approx(oracle, abs=1e-10)
    assert report.ssim_random < report.ssim_top_k <= report.ssim_oracle + 1e-12
    assert report.pool_size == 13 and report.queries == 14 and report.k == 3
    assert report.class_diff_top_k is not None and report.class_diff_random is not None
    assert report.class_diff_top_k < report.class_diff_random
    assert report.knn_class_mae is not None and report.knn_class_mae < 1.0
    assert 0 < report.relative <= 1.0 + 1e-9
    assert set(report.summary()) >= {"ssim_top_k", "ssim_random", "ssim_oracle", "relative"}


def test_evaluation_of_a_bad_model_is_near_random() -> None:
    images, labels = blobs(n=28)
    z = np.random.default_rng(5).standard_normal((28, 4)).astype(np.float32)  # latent unrelated to the images
    index = LatentIndex.build(z, {"name": "vae-b0", "version": "1"})
    good = evaluate_index(LatentIndex.build(labels[:, None].astype(np.float32) + 0.01 * z[:, :1],
                                            {"name": "vae-b0", "version": "1"}), images, labels, k=3, n_queries=28)
    bad = evaluate_index(index, images, labels, k=3, n_queries=28)
    assert bad.ssim_top_k < good.ssim_top_k
    assert bad.class_diff_top_k is not None and good.class_diff_top_k is not None
    assert bad.class_diff_top_k > good.class_diff_top_k


def test_evaluation_with_loader_sampled_pool_and_padding() -> None:
    images, labels = blobs(n=21, channels=3)
    calls: list[np.ndarray] = []

    def loader(rows: np.ndarray) -> np.ndarray:
        calls.append(rows)
        return (images[rows] * 255).astype(np.uint8)

    rec = np.array([[1, 2, -1], [-1, -1, -1], [0, 4, 5]])
    report = evaluate_recommendations(loader, [0, 3, 6], rec, n_images=21, labels=labels, pool_size=8, seed=1)
    assert report.pool_size == 8 and report.queries == 3
    assert np.isfinite([report.ssim_top_k, report.ssim_random, report.ssim_oracle]).all()
    assert calls and all(r.min() >= 0 for r in calls)
    with pytest.raises(ShapeError, match="n_images"):
        evaluate_recommendations(loader, [0], rec[:1])
    with pytest.raises(ShapeError, match="Q=2"):
        evaluate_recommendations(images, [0, 1], rec)
