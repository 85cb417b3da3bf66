"""mnistload: IDX, CIFAR, npz and image-folder readers on fixtures written here, embedded split,
fingerprint, and one test per validation error of user data."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from mnistload import (DatasetError, load_cifar10, load_dataset, load_image_folder, load_mnist_idx, read_idx,
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


# ---------------------------------------------------------------------------------------------
# npz: any image data in one file
# ---------------------------------------------------------------------------------------------
def write_npz(path, x_train=None, y_train=None, x_test=None, y_test=None, n_classes=3, seed=0, **extra):
    """A small valid npz (uint8 N×H×W, 3 balanced classes) with any array replaced."""
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.integers(0, 256, (60, 6, 5), dtype=np.uint8), "y_train": np.arange(60) % n_classes,
              "x_test": rng.integers(0, 256, (30, 6, 5), dtype=np.uint8), "y_test": np.arange(30) % n_classes}
    given = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    arrays.update({k: v for k, v in given.items() if v is not None}, **extra)
    np.savez(path, **{k: v for k, v in arrays.items() if not (isinstance(v, str) and v == "drop")})
    return arrays


def npz_config(path, *extra):
    return load_config(None, ["dataset=npz", f"data_path={path}", "arch=examples.digits_model:DigitsCNN",
                              "n_classes=3", "n_train=0", "n_val=15", "n_test=0", *extra])


def test_npz_uint8_hw_split_and_scaling(tmp_path):
    arrays = write_npz(tmp_path / "d.npz")
    ds = load_dataset(npz_config(tmp_path / "d.npz"))
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (45, 15, 30)
    assert ds.input_shape == (1, 6, 5) and ds.n_classes == 3 and ds.x_train.dtype == torch.float32
    assert np.bincount(ds.y_val.numpy()).tolist() == [5, 5, 5]
    expected = arrays["x_train"][ds.train_index].astype(np.float64) / 255.0  # uint8 0–255 → [0, 1]
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert load_dataset(npz_config(tmp_path / "d.npz")).fingerprint == ds.fingerprint
    write_npz(tmp_path / "e.npz", seed=1)
    assert load_dataset(npz_config(tmp_path / "e.npz")).fingerprint != ds.fingerprint


@pytest.mark.parametrize("layout,shape,expected", [
    ("NCHW", (60, 3, 6, 5), (3, 6, 5)),
    ("NHWC", (60, 6, 5, 3), (3, 6, 5)),
    ("NHWC gray", (60, 6, 5, 1), (1, 6, 5)),
    ("NCHW wins when both axes could be channels", (60, 4, 6, 3), (4, 6, 3)),
])
def test_npz_channel_layout_rule(tmp_path, layout, shape, expected):
    rng = np.random.default_rng(0)
    x_train = rng.random(shape).astype(np.float32)  # float images in [0, 1] are kept as they are
    x_test = rng.random((30, *shape[1:])).astype(np.float32)
    write_npz(tmp_path / "d.npz", x_train=x_train, x_test=x_test)
    ds = load_dataset(npz_config(tmp_path / "d.npz"))
    assert ds.input_shape == expected
    chw = x_train if expected == shape[1:] else x_train.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ds.x_train.numpy(), chw[ds.train_index])


@pytest.mark.parametrize("arrays,message", [
    ({"x_train": np.zeros((60, 30), np.uint8)}, r"x_train: expected a non-empty N×H×W, N×C×H×W or N×H×W×C array, "
                                                r"got shape \(60, 30\)"),
    ({"x_train": np.zeros((60, 5, 6, 7), np.uint8)}, r"x_train: cannot find the channel axis of shape \(60, 5, 6, 7\)"),
    ({"x_test": np.zeros((30, 6, 6), np.uint8)}, r"x_test images are 1×6×6 but x_train images are 1×6×5"),
], ids=["shape", "channel_axis", "train_test_shape"])
def test_npz_shape_errors(tmp_path, arrays, message):
    write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError, match=r"d.npz: " + message):
        load_dataset(npz_config(tmp_path / "d.npz"))


def test_npz_dtype_error(tmp_path):
    write_npz(tmp_path / "d.npz", x_train=np.zeros((60, 6, 5), np.int64))
    with pytest.raises(DatasetError, match=r"d.npz: x_train: expected uint8 \(0-255\) or float \(0-1\) images, "
                                           r"got dtype int64"):
        load_dataset(npz_config(tmp_path / "d.npz"))
    write_npz(tmp_path / "d.npz", y_train=(np.arange(60) % 3).astype(np.float32))
    with pytest.raises(DatasetError, match=r"d.npz: y_train: expected integer class labels, got dtype float32"):
        load_dataset(npz_config(tmp_path / "d.npz"))


def test_npz_float_range_and_nan_errors(tmp_path):
    x = np.full((60, 6, 5), 0.5, np.float32)
    x[3, 2, 1] = np.nan
    write_npz(tmp_path / "d.npz", x_train=x)
    with pytest.raises(DatasetError, match=r"d.npz: x_train: 1 NaN or infinite values"):
        load_dataset(npz_config(tmp_path / "d.npz"))
    write_npz(tmp_path / "d.npz", x_test=np.full((30, 6, 5), 255.0, np.float32))
    with pytest.raises(DatasetError, match=r"d.npz: x_test: float images must lie in \[0, 1\], found values in "
                                           r"\[255, 255\]"):
        load_dataset(npz_config(tmp_path / "d.npz"))


def test_npz_label_range_errors(tmp_path):
    y = np.arange(60) % 3
    y[7] = -1
    write_npz(tmp_path / "d.npz", y_train=y)
    with pytest.raises(DatasetError, match=r"d.npz: y_train: labels must be integers 0..C-1, found -1"):
        load_dataset(npz_config(tmp_path / "d.npz"))
    write_npz(tmp_path / "d.npz", y_test=np.arange(30) % 5)  # a class beyond n_classes 3
    with pytest.raises(DatasetError, match=r"d.npz: the labels span 0..4 \(5 classes\) but n_classes is 3; "
                                           r"set n_classes: 5"):
        load_dataset(npz_config(tmp_path / "d.npz"))
    write_npz(tmp_path / "d.npz", y_train=np.arange(59) % 3)
    with pytest.raises(DatasetError, match=r"d.npz: y_train: expected 60 labels"):
        load_dataset(npz_config(tmp_path / "d.npz"))


def test_npz_empty_class_error(tmp_path):
    write_npz(tmp_path / "d.npz", y_train=np.where(np.arange(60) % 3 == 1, 0, np.arange(60) % 3))
    with pytest.raises(DatasetError, match=r"d.npz: class 1 has no training images"):
        load_dataset(npz_config(tmp_path / "d.npz"))


def test_npz_too_few_inputs_for_the_splits(tmp_path):
    write_npz(tmp_path / "d.npz")
    with pytest.raises(DatasetError, match=r"d.npz: n_val 50 \+ n_train 20 need more than the 60 training images"):
        load_dataset(npz_config(tmp_path / "d.npz", "n_val=50", "n_train=20"))
    with pytest.raises(DatasetError, match=r"d.npz: n_test 31 exceeds the 30 test images"):
        load_dataset(npz_config(tmp_path / "d.npz", "n_test=31"))


def test_npz_missing_file_key_and_pickles(tmp_path):
    with pytest.raises(DatasetError, match=r"nope.npz: npz file not found"):
        load_dataset(npz_config(tmp_path / "nope.npz"))
    write_npz(tmp_path / "d.npz", y_test="drop")
    with pytest.raises(DatasetError, match=r"d.npz: missing arrays \['y_test'\]"):
        load_dataset(npz_config(tmp_path / "d.npz"))
    write_npz(tmp_path / "d.npz", y_test=np.array([{"a": 1}] * 30, dtype=object))
    with pytest.raises(DatasetError, match=r"d.npz: array 'y_test' cannot be read without pickles"):
        load_dataset(npz_config(tmp_path / "d.npz"))


def test_npz_needs_data_path_and_builtin_arch_must_fit(tmp_path):
    with pytest.raises(ConfigError, match=r"'data_path' must be set for dataset npz"):
        load_config(None, ["dataset=npz"])
    write_npz(tmp_path / "d.npz")
    cfg = npz_config(tmp_path / "d.npz", "arch=mnist_convnet")
    with pytest.raises(DatasetError, match=r"arch 'mnist_convnet' takes 1×28×28 inputs but the images are 1×6×5"):
        load_dataset(cfg)


# ---------------------------------------------------------------------------------------------
# image_folder: class subfolders of PNG/JPEG files
# ---------------------------------------------------------------------------------------------
def make_image_folder(root, classes=("cat", "ant", "bee"), per_class=(6, 3), size=(5, 4), rgb=False, seed=0):
    """root/{train,test}/<class>/*.png; returns the pixels written, by (split, class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for split, n in zip(("train", "test"), per_class):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            written[split, cls] = []
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3) if rgb else (size[1], size[0]), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
                written[split, cls].append(pixels)
    return written


def image_config(root, *extra):
    return load_config(None, ["dataset=image_folder", f"data_path={root}", "arch=examples.digits_model:DigitsCNN",
                              "n_classes=3", "n_train=0", "n_val=3", "n_test=0", *extra])


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    written = make_image_folder(tmp_path / "imgs")
    x_tr, y_tr, x_te, y_te, classes = load_image_folder(tmp_path / "imgs")
    assert classes == ["ant", "bee", "cat"]  # class index = sorted folder names
    assert x_tr.shape == (18, 1, 4, 5) and x_tr.dtype == np.uint8 and y_tr.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    np.testing.assert_array_equal(x_tr[12:, 0], np.stack(written["train", "cat"]))  # lossless PNG
    np.testing.assert_array_equal(x_te[:3, 0], np.stack(written["test", "ant"]))
    ds = load_dataset(image_config(tmp_path / "imgs"))
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (15, 3, 9) and ds.input_shape == (1, 4, 5)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0


def test_image_folder_rgb_and_jpeg(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path / "imgs", rgb=True)
    Image.fromarray(np.full((4, 5), 200, np.uint8)).save(tmp_path / "imgs" / "train" / "ant" / "gray.JPG")
    x_tr, y_tr, _, _, _ = load_image_folder(tmp_path / "imgs")
    assert x_tr.shape == (19, 3, 4, 5)  # one colour image makes every image RGB
    assert np.abs(x_tr[0].astype(int) - 200).max() <= 2  # the grayscale JPEG, replicated over channels


def test_image_folder_empty_class(tmp_path):
    make_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"train/dog: empty class 'dog' \(no .png/.jpg/.jpeg files\)"):
        load_dataset(image_config(tmp_path / "imgs"))


def test_image_folder_size_mismatch_and_unreadable(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((7, 5), np.uint8)).save(tmp_path / "imgs" / "test" / "bee" / "odd.png")
    with pytest.raises(DatasetError, match=r"test/bee/odd.png: image is 5×7 \(W×H\) but .* is 5×4"):
        load_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "test" / "bee" / "odd.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"test/bee/odd.png: not a readable image"):
        load_image_folder(tmp_path / "imgs")


def test_image_folder_class_count_and_layout_errors(tmp_path):
    make_image_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match=r"imgs: the labels span 0..2 \(3 classes\) but n_classes is 4"):
        load_dataset(image_config(tmp_path / "imgs", "n_classes=4"))
    (tmp_path / "imgs" / "test" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"test: class folders \['dog'\] have no counterpart"):
        load_image_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match=r"nothing/train: folder not found"):
        load_image_folder(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary batches end to end
# ---------------------------------------------------------------------------------------------
def test_cifar10_binary_batches_train_one_model(tmp_path, isolated_outputs):
    """Binary batches with the real record layout (1 label byte + 3,072 pixel bytes, channel planes
    R, G, B of 32×32) and random bytes, loaded with dataset: cifar10 and trained through main.main."""
    import main as train

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}.bin", 12) for i in range(1, 6)] + [("test_batch.bin", 20)]:
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        (folder / name).write_bytes(records.tobytes())
    x_tr, y_tr, x_te, _ = load_cifar10(tmp_path)  # the archive's folder name is found
    assert x_tr.shape == (60, 3, 32, 32) and x_te.shape == (20, 3, 32, 32)
    assert x_tr[0, 1, 0, 0] == np.frombuffer((folder / "data_batch_1.bin").read_bytes(), np.uint8)[1 + 1024]
    argv = ["--config", "configs/smoke.yaml", "--set", "name=cifar_fixture", "--set", "dataset=cifar10",
            "--set", f"data_dir={tmp_path}", "--set", "arch=cifar_cnn", "--set", "n_train=0", "--set", "n_val=10",
            "--set", "n_test=0", "--set", "n_models=1", "--set", "num_epochs=1", "--set", "deepfool_max_iter=3",
            "--set", "deepfool_n_test=5"]
    assert train.main(argv) == 0
    summary = json.loads((isolated_outputs / "results" / "cifar_fixture" / "variants" / "baseline" / "train.json")
                         .read_text())
    assert summary["n_train"] == [50] and summary["models"][0]["n_test"] == 20
    assert (isolated_outputs / "model" / "cifar_fixture" / "baseline_s0.pt").is_file()
