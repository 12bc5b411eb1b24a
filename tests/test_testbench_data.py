"""Testbench data: shapes, determinism, exact label noise, stratification, train-only blur, IDX files."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest
import torch

from mgs_bench import data as D
from mgs_bench.data import (
    flip_labels,
    load_dataset,
    load_idx_pair,
    motion_blur,
    motion_blur_kernel,
    read_idx,
    stratified_indices,
    write_idx,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name,shape,q,task",
    [("circles", (2,), 2, "classification"), ("digits", (1, 8, 8), 10, "classification"),
     ("mnist1d", (1, 40), 10, "classification"), ("diabetes", (10,), 1, "regression")],
)
def test_shapes_and_dtypes(name, shape, q, task):
    d = load_dataset(name, train_size=100, noise=0.3, seed=1, val_size=50)
    assert (d.task, d.num_outputs, d.input_shape) == (task, q, shape)
    assert d.x_train.shape == (100, *shape) and d.x_val.shape == (50, *shape) and d.x_test.shape[1:] == shape
    assert d.x_train.dtype == torch.float32
    if task == "classification":
        assert d.y_train.dtype == torch.long and d.y_train.shape == (100,)
        assert int(d.y_test.max()) < q and int(d.y_train.min()) >= 0
    else:
        assert d.y_train.shape == (100, 1) and d.y_train.dtype == torch.float32


def test_same_seed_same_data_other_seed_other_subset_same_test_set():
    a = load_dataset("digits", train_size=200, noise=0.6, seed=3)
    b = load_dataset("digits", train_size=200, noise=0.6, seed=3)
    c = load_dataset("digits", train_size=200, noise=0.6, seed=4)
    for f in ("x_train", "y_train", "y_train_clean", "noisy_mask", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.equal(a.x_test, c.x_test) and torch.equal(a.y_test, c.y_test)  # the test set never depends on the seed


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.8, 1.0])
def test_label_noise_flips_exactly_the_requested_fraction_to_other_classes(fraction):
    d = load_dataset("digits", train_size=250, noise=fraction, seed=0)
    flipped = d.y_train != d.y_train_clean
    assert int(flipped.sum()) == round(fraction * 250)
    assert torch.equal(flipped, d.noisy_mask)  # every flipped label changed class


def test_flips_are_uniform_over_the_other_classes():
    rng = np.random.default_rng(0)
    y = np.zeros(40_000, dtype=np.int64)
    new, mask = flip_labels(y, 0.5, 5, rng)
    assert mask.sum() == 20_000 and (new[mask] != 0).all() and (new[~mask] == 0).all()
    counts = np.bincount(new[mask], minlength=5)[1:]
    assert np.all(np.abs(counts / 20_000 - 0.25) < 0.015), counts


def test_flip_labels_validates():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flip_labels(np.zeros(3, dtype=int), 1.5, 3, np.random.default_rng(0))


def test_stratified_subset_matches_class_proportions():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    idx = stratified_indices(y, 37, np.random.default_rng(1))
    assert len(idx) == 37 and len(set(idx)) == 37
    counts = np.bincount(y[idx], minlength=4)
    assert np.all(np.abs(counts - 37 * np.array([50, 30, 15, 5]) / 100) < 1), counts
    d = load_dataset("digits", train_size=100, seed=5)
    assert np.bincount(d.y_train_clean.numpy(), minlength=10).min() >= 9  # digits are ~balanced: 10 ± 1 per class
    with pytest.raises(ValueError, match="training size"):
        stratified_indices(y, 101, np.random.default_rng(0))


def test_motion_blur_is_applied_to_training_images_only():
    blurred = load_dataset("digits", train_size=100, seed=2)
    clean = load_dataset("digits", train_size=100, seed=2, blur_length=0)
    assert torch.equal(blurred.y_train_clean, clean.y_train_clean)  # same samples
    assert not torch.allclose(blurred.x_train, clean.x_train)
    assert torch.equal(blurred.x_val, clean.x_val) and torch.equal(blurred.x_test, clean.x_test)
    # the test images are the raw scans / 16
    from sklearn.datasets import load_digits

    raw = {tuple(np.round(im.ravel() / 16, 5)) for im in load_digits().images}
    assert all(tuple(np.round(x.numpy().ravel().astype(np.float64), 5)) in raw for x in blurred.x_test[:50])
    assert not any(tuple(np.round(x.numpy().ravel().astype(np.float64), 5)) in raw for x in blurred.x_train[:20])


def test_motion_blur_kernel_and_blur():
    k = motion_blur_kernel(3, 0)
    assert k.shape == (5, 5) and abs(k.sum() - 1) < 1e-12 and np.allclose(k, k[::-1, ::-1])
    assert np.count_nonzero(k[[0, 1, 3, 4]]) == 0  # horizontal: one row only
    img = np.zeros((1, 9, 9))
    img[0, 4, 4] = 1.0
    out = motion_blur(img, 3, np.array([90.0]))
    assert abs(out.sum() - 1) < 1e-12 and np.count_nonzero(np.round(out[0], 12)[:, [0, 1, 2, 3, 5, 6, 7, 8]]) == 0  # vertical smear


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(123)
    random.seed(123)
    before = np.random.get_state()[1].copy(), random.getstate()
    D._mnist1d.cache_clear()
    load_dataset("mnist1d", train_size=50, seed=0)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]


def test_regression_noise_on_training_targets_only():
    clean = load_dataset("diabetes", train_size=200, noise=0.0, seed=0)
    noisy = load_dataset("diabetes", train_size=200, noise=2.0, seed=0)
    assert torch.equal(clean.y_train, clean.y_train_clean)
    assert torch.equal(noisy.y_train_clean, clean.y_train_clean) and torch.equal(noisy.y_test, clean.y_test)
    resid = (noisy.y_train - noisy.y_train_clean).numpy()
    assert 1.6 < resid.std() < 2.4


def test_unknown_dataset_lists_the_allowed_names():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("cifar", train_size=10)


# ------------------------------------------------------------------------------------------------ IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file built by hand (independent of write_idx): uint8 data only."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_parses_hand_written_files(tmp_path, compressed):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(arr)
    path = tmp_path / ("x.idx.gz" if compressed else "x.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    assert np.array_equal(read_idx(path), arr)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.random.default_rng(0).random((5, 7)) * 100).astype(dtype)
    write_idx(tmp_path / f"a{suffix}", arr)
    back = read_idx(tmp_path / f"a{suffix}")
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 4), np.uint8))[:-3])
    with pytest.raises(ValueError, match="header announces"):
        read_idx(tmp_path / "short")


def _write_mnist(folder, n_train=40, n_test=20, size=6, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    parts = {"train": n_train, "t10k": n_test}
    out = {}
    for split, n in parts.items():
        images = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
        labels = np.tile(np.arange(10), n // 10 + 1)[:n].astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", labels)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("layout,gz", [("flat", True), ("torchvision", False)])
def test_load_idx_pair_finds_files_in_both_layouts(tmp_path, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    written = _write_mnist(folder, gz=gz)
    for split, key in (("train", "train"), ("test", "t10k")):
        images, labels = load_idx_pair(tmp_path, split, backend="builtin")
        assert np.array_equal(images, written[key][0]) and np.array_equal(labels, written[key][1])


def test_idx_dataset_trains_from_files_on_disk(tmp_path):
    _write_mnist(tmp_path / "mnist", n_train=60, size=8)
    d = load_dataset("mnist", train_size=30, noise=0.5, seed=0, root=str(tmp_path))
    assert d.input_shape == (1, 8, 8) and d.num_outputs == 10 and d.x_train.shape == (30, 1, 8, 8)
    assert float(d.x_train.max()) <= 1.0 and int((d.y_train != d.y_train_clean).sum()) == 15
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_idx_pair(tmp_path / "nothing", "train")
    with pytest.raises(ValueError, match="root="):
        load_dataset("fashion_mnist", train_size=10)


def test_torchvision_backend_is_optional(tmp_path):
    _write_mnist(tmp_path, gz=False)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            load_idx_pair(tmp_path, "train", backend="torchvision")
        images, _ = load_idx_pair(tmp_path, "train")  # auto falls back to the builtin parser
        assert images.shape == (40, 6, 6)
    else:  # pragma: no cover - torchvision is not installed here
        a, _ = load_idx_pair(tmp_path, "train", backend="torchvision")
        b, _ = load_idx_pair(tmp_path, "train", backend="builtin")
        assert np.array_equal(a, b)
