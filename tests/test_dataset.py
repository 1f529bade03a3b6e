"""The store schema and reader: metadata, splits without leakage, shards, batches, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from deepgalaxy.core.dataset import METADATA_KEYS, open_dataset
from deepgalaxy.core.errors import DatasetError, ShapeError
from deepgalaxy.core.schema import SCHEMA_VERSION, label_for_snapshot
from tests._data_helpers import TINY, copy_store, tiny_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("ds") / "tiny.zarr")


@pytest.fixture
def damaged(store: Path, tmp_path: Path) -> Path:
    return copy_store(store, tmp_path / "damaged.zarr")


# -- schema ----------------------------------------------------------------------------------------------------------


def test_schema_arrays_dtypes_chunks_and_attributes(store: Path) -> None:
    root = zarr.open_group(str(store), mode="r")
    n = TINY["sims"] * TINY["cameras"] * TINY["snapshots"]
    assert root["images"].dtype == np.uint8 and root["images"].shape == (n, 16, 16, 1)
    assert root["images"].chunks == (TINY["snapshots"], 16, 16, 1)  # one camera's time sequence per chunk
    assert root["labels"].dtype == np.int16
    for name, dtype in [("sim_id", "int32"), ("camera", "int16"), ("mass_ratio", "float32"),
                        ("snapshot", "int16"), ("time", "float32")]:
        assert root[f"meta/{name}"].dtype == np.dtype(dtype) and root[f"meta/{name}"].shape == (n,)
    attrs = root.attrs["deepgalaxy"]
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["num_classes"] == 71 and attrs["complete"]
    assert attrs["generator"]["name"] == "deepgalaxy.simulation" and attrs["generator"]["params"]["sims"] == 4
    assert {"created", "deepgalaxy", "zarr"} <= set(attrs["provenance"])
    json.dumps(attrs)  # plain JSON


def test_reader_contract(store: Path) -> None:
    ds = open_dataset(store)
    assert len(ds) == 64 and ds.num_classes == 71 and ds.image_shape == (16, 16, 1) and str(ds.path) == str(store)
    md = ds.metadata
    assert set(md) == set(METADATA_KEYS)
    assert all(len(v) == 64 for v in md.values())
    # row order: sim, camera, snapshot; labels spread snapshots 0..7 over classes 0..70
    assert md["sim_id"].tolist() == np.repeat(np.arange(4), 16).tolist()
    assert md["snapshot"][:8].tolist() == list(range(8))
    assert ds.labels.dtype == np.int16
    assert ds.labels[:8].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    assert np.all(np.diff(md["time"][:8]) > 0)
    imgs = ds.images([0, 63, 5])
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 16, 16, 1) and imgs.max() > 0
    assert len(ds.fingerprint()) == 12 and ds.fingerprint() == open_dataset(store).fingerprint()


def test_label_rule() -> None:
    assert label_for_snapshot(np.arange(71), 71).tolist() == list(range(71))
    assert label_for_snapshot(np.arange(8), 8).tolist() == [0, 10, 20, 30, 40, 50, 60, 70]


# -- splits and shards -----------------------------------------------------------------------------------------------


def test_simulation_split_never_shares_a_simulation(store: Path) -> None:
    ds = open_dataset(store)
    train, val = ds.split("simulation", 0.25, seed=1)
    assert len(train) + len(val) == len(ds)
    assert not set(train.indices) & set(val.indices)
    assert not set(train.metadata["sim_id"]) & set(val.metadata["sim_id"])
    assert len(set(val.metadata["sim_id"])) == 1
    assert np.all(np.diff(train.indices) > 0)
    again = ds.split("simulation", 0.25, seed=1)[1]
    assert np.array_equal(again.indices, val.indices)


def test_random_split_is_the_papers_image_split(store: Path) -> None:
    ds = open_dataset(store)
    train, val = ds.split("random", 0.2, seed=0)
    assert len(val) == round(0.2 * 64) and len(train) == 64 - len(val)
    assert not set(train.indices) & set(val.indices)
    assert set(val.metadata["sim_id"]) & set(train.metadata["sim_id"])  # images of one sim on both sides


@pytest.mark.parametrize("kind", ["simulation", "random"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_are_disjoint_equal_and_cover_the_split(store: Path, kind: str, size: int) -> None:
    train, val = open_dataset(store).split(kind, 0.25, seed=0)
    for part in (train, val):
        shards = [part.shard(r, size) for r in range(size)]
        sizes = {len(s) for s in shards}
        assert sizes == {len(part) // size}  # equal step counts on every rank
        union = np.concatenate([s.indices for s in shards])
        assert len(np.unique(union)) == len(union)  # no overlap
        assert set(union) <= set(part.indices)
        assert len(part) - len(union) == len(part) % size  # only the remainder is left out


def test_shards_are_chunk_aligned(store: Path) -> None:
    ds = open_dataset(store)
    train, _ = ds.split("simulation", 0.25)
    shards = [train.shard(r, 2) for r in range(2)]
    chunks = [set((s.indices // ds.chunk_len).tolist()) for s in shards]
    assert len(chunks[0] & chunks[1]) <= 1  # at most the chunk where the cut falls


def test_batches_order_is_identical_across_processes_and_changes_per_epoch(store: Path) -> None:
    shard = open_dataset(store).split("simulation", 0.25)[0].shard(1, 2)
    other = open_dataset(store).split("simulation", 0.25)[0].shard(1, 2)  # as another process would build it
    a = [y.tolist() for _, y in shard.batches(4, epoch=3, seed=5)]
    b = [y.tolist() for _, y in other.batches(4, epoch=3, seed=5)]
    c = [y.tolist() for _, y in shard.batches(4, epoch=4, seed=5)]
    assert a == b and a != c
    assert np.array_equal(shard.epoch_order(3, 5), other.epoch_order(3, 5))
    assert sorted(shard.epoch_order(3, 5).tolist()) == shard.indices.tolist()


def test_batches_values_types_and_resume(store: Path) -> None:
    ds = open_dataset(store)
    val = ds.split("simulation", 0.25)[1]
    assert val.num_batches(5) == 3 and val.num_batches(5, drop_last=False) == 4
    full = list(val.batches(5, epoch=0, seed=0))
    assert len(full) == 3
    x, y = full[0]
    assert x.dtype == np.float32 and x.shape == (5, 16, 16, 1) and x.min() >= 0 and x.max() <= 1
    assert y.dtype == np.int64
    order = val.epoch_order(0, 0)[:5]
    assert np.allclose(x, ds.images(order) / 255.0) and np.array_equal(y, ds.labels[order])
    resumed = list(val.batches(5, epoch=0, seed=0, start_batch=2))
    assert len(resumed) == 1 and np.array_equal(resumed[0][1], full[2][1])
    tail = list(val.batches(5, shuffle=False, drop_last=False))
    assert [len(b[1]) for b in tail] == [5, 5, 5, 1]
    assert np.concatenate([b[1] for b in tail]).tolist() == val.labels.tolist()
    # second epoch comes from the resident copy and must give the same pixels
    again = list(val.batches(5, epoch=0, seed=0))
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(full, again, strict=True))


def test_subset_images_take_local_positions(store: Path) -> None:
    ds = open_dataset(store)
    _, val = ds.split("simulation", 0.25)
    assert np.array_equal(val.images([0, 1]), ds.images(val.indices[:2]))
    with pytest.raises(DatasetError, match="local positions"):
        val.images([len(val)])


def test_closing_a_batch_iterator_early_stops_its_threads(store: Path) -> None:
    import threading

    ds = open_dataset(store, cache_bytes=0)
    before = threading.active_count()
    for i, _ in enumerate(ds.batches(2, prefetch=1)):
        if i == 1:
            break
    assert threading.active_count() <= before


def test_batches_from_ram_are_made_in_the_consumers_thread_and_equal_the_streamed_ones(store: Path) -> None:
    """From the second epoch (images resident) no loader thread runs: a thread's hand-off per batch cost 10-25% of
    the in-memory rate (benchmarks/data.py) with nothing to hide. Order, resume position and pixels are those of the
    streaming loader."""
    import threading

    def loader_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("deepgalaxy-")]

    shard = open_dataset(store).split("simulation", 0.25)[0].shard(0, 2)
    streamed = open_dataset(store, cache_bytes=0).split("simulation", 0.25)[0].shard(0, 2)
    first = list(shard.batches(3, epoch=0, seed=1))
    assert shard._resident is not None and shard._resident.complete
    for epoch, start in ((0, 0), (2, 0), (2, 3)):
        seen = []
        for x, y in shard.batches(3, epoch=epoch, seed=1, start_batch=start):
            seen.append((x, y))
            assert loader_threads() == []
        want = list(streamed.batches(3, epoch=epoch, seed=1, start_batch=start))
        assert len(seen) == len(want) > 0
        for (x, y), (wx, wy) in zip(seen, want, strict=True):
            assert x.dtype == wx.dtype and np.array_equal(x, wx) and np.array_equal(y, wy)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, list(shard.batches(3, epoch=0, seed=1)), strict=True))


# -- bad input -------------------------------------------------------------------------------------------------------


def test_missing_path_and_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nosuch\.zarr: no such dataset store"):
        open_dataset(tmp_path / "nosuch.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match=r"plain: not a deepgalaxy dataset"):
        open_dataset(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(2,), dtype="i1")
    with pytest.raises(DatasetError, match=r"other\.zarr: a Zarr store but not a deepgalaxy dataset"):
        open_dataset(tmp_path / "other.zarr")


def test_newer_schema_version(damaged: Path) -> None:
    root = zarr.open_group(str(damaged), mode="r+")
    root.attrs["deepgalaxy"] = {**root.attrs["deepgalaxy"], "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(DatasetError, match=rf"damaged\.zarr: written with dataset schema version {SCHEMA_VERSION + 1}"):
        open_dataset(damaged)


def test_missing_array(damaged: Path) -> None:
    import shutil

    shutil.rmtree(damaged / "meta" / "camera")
    with pytest.raises(DatasetError, match=r"damaged\.zarr: array 'meta/camera' is missing"):
        open_dataset(damaged)


def test_missing_chunk_file_is_detected(damaged: Path) -> None:
    (damaged / "images" / "c" / "3" / "0" / "0" / "0").unlink()
    with pytest.raises(DatasetError, match=r"damaged\.zarr: array 'images': 1 chunk file\(s\) missing: "
                                           r"c/3/0/0/0 \(indices 24\.\.31\)"):
        open_dataset(damaged)


def test_corrupt_chunk_file_names_array_and_range(damaged: Path) -> None:
    chunk = damaged / "images" / "c" / "5" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    ds = open_dataset(damaged)  # detected when read, not at open (that would decode everything)
    with pytest.raises(DatasetError, match=r"array 'images' chunk c/5/0/0/0 \(indices 40\.\.47\) cannot be read"):
        ds.images([41])
    with pytest.raises(DatasetError, match=r"chunk c/5/0/0/0 \(indices 40\.\.47\)"):
        for _ in ds.batches(8, shuffle=False):
            pass


def test_corrupt_labels_chunk(damaged: Path) -> None:
    chunk = damaged / "labels" / "c" / "1"
    chunk.write_bytes(b"garbage" + chunk.read_bytes()[7:])
    with pytest.raises(DatasetError, match=r"array 'labels' chunk c/1 \(indices 16\.\.31\) cannot be read"):
        open_dataset(damaged)


def test_labels_out_of_range(damaged: Path) -> None:
    root = zarr.open_group(str(damaged), mode="r+")
    root["labels"][20:22] = 71
    with pytest.raises(DatasetError, match=r"array 'labels': 2 labels out of range -1\.\.70 at indices 20\.\.21"):
        open_dataset(damaged)


def test_empty_selections(store: Path) -> None:
    ds = open_dataset(store)
    with pytest.raises(DatasetError, match=r"tiny\.zarr: array 'images': empty selection"):
        ds.images([])
    with pytest.raises(DatasetError, match="empty selection"):
        ds.shard(0, 65)
    _, val = ds.split("simulation", 0.25)
    with pytest.raises(DatasetError, match=r"array 'images': empty selection: .* has no full batch of 100"):
        list(val.batches(100))
    with pytest.raises(DatasetError, match="empty selection"):
        ds.split("simulation", 0.01)
    with pytest.raises(DatasetError, match="out of range"):
        ds.images([64])


def test_shape_that_does_not_match_the_model(store: Path) -> None:
    ds = open_dataset(store)
    ds.check_shape((16, 16, 1))
    with pytest.raises(ShapeError, match=r"tiny\.zarr: array 'images' \(indices 0\.\.63\) holds images of shape "
                                        r"\(16, 16, 1\) .* card 'x' expects \(128, 128, 3\)"):
        ds.check_shape((128, 128, 3), model="card 'x'")


def test_incomplete_store_is_refused_unless_asked(damaged: Path) -> None:
    root = zarr.open_group(str(damaged), mode="r+")
    root.attrs["deepgalaxy"] = {**root.attrs["deepgalaxy"], "complete": False}
    root["sims/done"][2] = False
    with pytest.raises(DatasetError, match=r"incomplete store: writing was interrupted \(48 of 64 images"):
        open_dataset(damaged)
    partial = open_dataset(damaged, allow_incomplete=True)
    assert len(partial) == 48 and 2 not in set(partial.metadata["sim_id"])


def test_images_take_positions_on_an_incomplete_dataset_too(damaged: Path) -> None:
    root = zarr.open_group(str(damaged), mode="r+")
    root.attrs["deepgalaxy"] = {**root.attrs["deepgalaxy"], "complete": False}
    root["sims/done"][0] = False
    partial = open_dataset(damaged, allow_incomplete=True)
    assert partial.indices[0] == 16  # simulation 0 (rows 0..15) is not finished
    full = zarr.open_group(str(damaged), mode="r")["images"]
    assert np.array_equal(partial.images([0, 47]), full[[16, 63]])
    with pytest.raises(DatasetError, match=r"positions 48\.\.48 are out of range .* local positions 0\.\.47"):
        partial.images([48])
