"""mnistload: IDX and CIFAR readers on fixtures written here, embedded split, fingerprint."""
import gzip
import struct

import numpy as np
import pytest

from config import ConfigError, load_config
from mnistload import (DatasetError, load_cifar10, load_dataset, load_mnist_idx, read_idx,
                       stratified_take)


def write_idx(path, array, magic=None, gz=False):
    """Write an unsigned-byte IDX file the plain way: magic, big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x0800 + array.ndim
    blob = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def make_mnist_folder(folder, n_train=120, n_test=40, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in data.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz=gz)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_roundtrip(tmp_path, gz):
    data = make_mnist_folder(tmp_path / "mnist", gz=gz)
    x_tr, y_tr, x_te, y_te = load_mnist_idx(tmp_path / "mnist")
    np.testing.assert_array_equal(x_tr, data["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_tr, data["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(x_te, data["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_te, data["t10k-labels-idx1-ubyte"])


def test_idx_truncated(tmp_path):
    path = tmp_path / "t"
    write_idx(path, np.zeros((5, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=r"t: truncated"):
        read_idx(path, 3)
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetError, match="truncated header"):
        read_idx(path, 3)


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    write_idx(path, np.zeros((5, 28, 28)), magic=0x0000080D)
    with pytest.raises(DatasetError, match=r"bad: wrong magic number 0x0000080d \(expected 0x00000803"):
        read_idx(path, 3)


def test_idx_count_mismatch(tmp_path):
    folder = tmp_path / "mnist"
    make_mnist_folder(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(119))
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte: 119 labels for 120 images"):
        load_mnist_idx(folder)


def test_idx_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        load_mnist_idx(tmp_path / "nope")
    folder = tmp_path / "mnist"
    make_mnist_folder(folder)
    (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte: missing MNIST IDX file"):
        load_mnist_idx(folder)


def test_mnist_idx_dataset_split(tmp_path):
    make_mnist_folder(tmp_path / "mnist", n_train=200, n_test=50)
    cfg = load_config(None, ["dataset=mnist", f"data_dir={tmp_path / 'mnist'}", "n_train=0",
                             "n_val=40", "n_test=0"])
    ds = load_dataset(cfg)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (160, 40, 50)
    assert set(ds.train_index).isdisjoint(ds.val_index)
    assert np.bincount(ds.y_val.numpy()).tolist() == [4] * 10  # stratified: 40 over 10 balanced classes
    assert ds.x_train.shape[1:] == (1, 28, 28) and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    # changing one pixel of the data changes the fingerprint
    make_mnist_folder(tmp_path / "mnist2", n_train=200, n_test=50, seed=1)
    cfg2 = dict(cfg, data_dir=str(tmp_path / "mnist2"))
    assert load_dataset(cfg2).fingerprint != ds.fingerprint


def test_cifar_reader(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar"
    folder.mkdir()
    expected = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 7).astype(np.uint8)
        pixels = rng.integers(0, 256, (7, 3072)).astype(np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        expected[name] = (labels, pixels.reshape(7, 3, 32, 32))
    x_tr, y_tr, x_te, y_te = load_cifar10(folder)
    assert x_tr.shape == (35, 3, 32, 32) and x_te.shape == (7, 3, 32, 32)
    np.testing.assert_array_equal(x_tr[7:14], expected["data_batch_2.bin"][1])
    np.testing.assert_array_equal(y_te, expected["test_batch.bin"][0])
    (folder / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="test_batch.bin: size 100 is not a positive multiple of 3073"):
        load_cifar10(folder)


def test_mnist5k_split_sizes_stratified_deterministic():
    cfg = load_config("configs/default.yaml")
    ds = load_dataset(cfg)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (3500, 500, 1000)
    for y, per_class in ((ds.y_train, 350), (ds.y_val, 50), (ds.y_test, 100)):
        assert np.bincount(y.numpy(), minlength=10).tolist() == [per_class] * 10
    all_idx = np.concatenate([ds.train_index, ds.val_index, ds.test_index])
    assert len(np.unique(all_idx)) == 5000
    assert ds.x_train.dtype.is_floating_point and float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0
    again = load_dataset(cfg)
    assert again.fingerprint == ds.fingerprint and np.array_equal(again.train_index, ds.train_index)
    other = load_dataset(dict(cfg, split_seed=1))
    assert other.fingerprint != ds.fingerprint


def test_stratified_take_rounding():
    labels = np.array([0] * 7 + [1] * 3)
    taken = stratified_take(labels, np.arange(10), 5, np.random.default_rng(0))
    assert len(taken) == 5 and np.bincount(labels[taken]).tolist() == [4, 1]  # 3.5→4 (largest remainder), 1.5→1
    with pytest.raises(DatasetError, match="asks for 11 images but only 10"):
        stratified_take(labels, np.arange(10), 11, np.random.default_rng(0))


def test_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="'dataset' must be mnist5k, mnist, cifar10, npz or image_folder"):
        load_config(None, ["dataset=imagenet"])
