"""Dataset readers on tiny folders / files made in tmp_path, plus the shipped MNIST copy."""

import gzip
import pickle
import struct

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeexit import datasets
from edgeexit.datasets import load_dataset, train_val_split
from edgeexit.errors import DatasetError

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)


def _folder(tmp_path, sizes=((6, 5), (6, 5)), mode="L"):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    arrays = []
    for cls, (w, h) in zip(("cat", "dog"), sizes):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            shape = (h, w) if mode == "L" else (h, w, 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / cls / f"{i}.png")
            arrays.append(arr)
    return root, arrays


def test_image_folder_reads_classes_and_pixels(tmp_path):
    root, arrays = _folder(tmp_path)
    data = load_dataset(str(root))
    assert data.classes == ("cat", "dog")
    assert data.images.shape == (6, 5, 6, 1) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.images[4, :, :, 0], arrays[4])  # PNG is lossless


def test_image_folder_rgb_and_limit(tmp_path):
    root, _ = _folder(tmp_path, mode="RGB")
    data = load_dataset(str(root), limit=4)
    assert data.images.shape == (4, 5, 6, 3)


def test_image_folder_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(str(empty))
    root, _ = _folder(tmp_path, sizes=((6, 5), (7, 5)))
    with pytest.raises(DatasetError, match=r"dog/0\.png is 7x5x1 but .* is 6x5x1"):
        load_dataset(str(root))
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.png"):
        load_dataset(str(bad))


def test_npz_with_both_key_styles(tmp_path):
    x = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    np.savez(tmp_path / "a.npz", images=x, labels=np.array([0, 1, 2, 1]), classes=np.array(["r", "g", "b"]))
    np.savez(tmp_path / "b.npz", x=x[..., None], y=np.array([1, 0, 1, 0], dtype=np.int32))
    a, b = load_dataset(str(tmp_path / "a.npz")), load_dataset(str(tmp_path / "b.npz"))
    assert a.images.shape == (4, 3, 3, 1) and a.classes == ("r", "g", "b")
    assert b.classes == ("0", "1") and b.labels.dtype == np.int64
    np.testing.assert_array_equal(a.images, b.images)


def test_slices_give_disjoint_parts_for_tuning_and_held_out_evaluation(tmp_path):
    x = np.arange(10 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2)
    np.savez(tmp_path / "s.npz", images=x, labels=np.arange(10) % 3)
    path = str(tmp_path / "s.npz")
    even, odd = load_dataset(path + "[0::2]"), load_dataset(path + "[1::2]")
    np.testing.assert_array_equal(even.images[..., 0], x[0::2])
    np.testing.assert_array_equal(odd.labels, (np.arange(10) % 3)[1::2])
    assert even.name.endswith("[:2]") is False and even.name.endswith("[::2]") and odd.name.endswith("[1::2]")
    middle = load_dataset(path + "[2:5]")
    np.testing.assert_array_equal(middle.images[..., 0], x[2:5])
    for bad, match in (("[5:2]", "selects nothing"), ("[0::0]", "STEP >= 1"), ("[a:3]", "bad slice"),
                       ("[3]", "bad slice"), ("[1:2:3:4]", "bad slice")):
        with pytest.raises(DatasetError, match=match):
            load_dataset(path + bad)


@pytest.mark.parametrize("arrays,match", [
    ({"pixels": np.zeros((2, 3, 3), np.uint8)}, "expected 'images'"),
    ({"images": np.zeros((2, 3, 3), np.float32), "labels": np.zeros(2, np.int64)}, "expected uint8"),
    ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "one label per image"),
], ids=["keys", "dtype", "count"])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(tmp_path / "d.npz"))


def test_corrupt_npz_and_unknown_spec(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(str(tmp_path / "c.npz"))
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet-21k'.*mnist"):
        load_dataset("imagenet-21k")
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("mnist", split="validation")


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 7]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    train = load_dataset(f"cifar10:{tmp_path}", "train")
    test = load_dataset(f"cifar10:{tmp_path}", "test")
    assert train.images.shape == (10, 32, 32, 3) and test.images.shape == (2, 32, 32, 3)
    assert test.classes[3] == "cat"
    raw = pickle.loads((tmp_path / "test_batch").read_bytes())["data"][0]
    np.testing.assert_array_equal(test.images[0, :, :, 1], raw[1024:2048].reshape(32, 32))  # green plane
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset(f"cifar10:{tmp_path / 'missing'}", "train")


def test_fashion_mnist_idx_files(tmp_path, monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">BBBB3I", 0, 0, 8, 3, 2, 28, 28) + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 2) + bytes([9, 0]))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    data = load_dataset("fashion-mnist", "test")
    np.testing.assert_array_equal(data.images[..., 0], images)
    assert data.labels.tolist() == [9, 0] and data.classes[9] == "Ankle boot"
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")


def test_svhn_without_file_says_what_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_dataset(f"svhn:{tmp_path}", "test")


def test_mnist_shape_dtype_and_exact_pixels():
    import gzip
    import importlib.util
    import pickle

    data = load_dataset("mnist", "test", limit=500)
    assert data.images.shape == (500, 28, 28, 1) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the MNIST test set
    # the packaged file stores pixel / 256 as float32: every value is an exact multiple of 1/256, so the
    # original uint8 pixels come back without rounding; read it here independently of the loader
    spec = importlib.util.find_spec("mnist")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz", "rb") as fh:
        _, _, (x, y) = pickle.load(fh, encoding="latin1")
    raw = np.asarray(x[:500], dtype=np.float64) * 256.0                   # [500, 784]
    assert np.array_equal(raw, np.floor(raw)) and raw.min() == 0 and raw.max() == 255
    np.testing.assert_array_equal(data.images.reshape(500, 784), raw.astype(np.uint8))
    np.testing.assert_array_equal(data.labels, np.asarray(y[:500]))


def test_train_val_split_is_seeded_and_disjoint(tmp_path):
    x = np.arange(20, dtype=np.uint8).reshape(20, 1, 1)
    np.savez(tmp_path / "s.npz", images=x, labels=np.arange(20) % 2)
    data = load_dataset(str(tmp_path / "s.npz"))
    tr, va = train_val_split(data, 0.25, seed=3)
    tr2, va2 = train_val_split(data, 0.25, seed=3)
    assert len(va) == 5 and len(tr) == 15
    np.testing.assert_array_equal(va.images, va2.images)
    assert not set(tr.images.ravel()) & set(va.images.ravel())
    with pytest.raises(DatasetError, match="val_fraction"):
        train_val_split(data, 1.0)


def test_npz_with_train_and_test_arrays(tmp_path):
    rng = np.random.default_rng(3)
    x_train, x_test = (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) for n in (6, 4))
    np.savez(tmp_path / "k.npz", x_train=x_train, y_train=np.array([0, 1, 2, 3, 4, 1]), x_test=x_test,
             y_test=np.array([1, 1, 0, 0]))
    train, test = load_dataset(str(tmp_path / "k.npz"), "train"), load_dataset(str(tmp_path / "k.npz"), "test")
    np.testing.assert_array_equal(train.images[..., 0], x_train)
    np.testing.assert_array_equal(test.images[..., 0], x_test)
    assert test.labels.tolist() == [1, 1, 0, 0]
    assert len(test.classes) == 5  # classes span both splits, not only the labels present in the test split
    assert train.name != test.name  # calibration_and_verification tells split sets by their names
    np.savez(tmp_path / "half.npz", x_train=x_train, y_train=np.zeros(6, np.int64))
    with pytest.raises(DatasetError, match="not 'x_test' and 'y_test' for the test split"):
        load_dataset(str(tmp_path / "half.npz"), "test")


def test_fashion_mnist_from_a_folder(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, 3, 28, 28) + images.tobytes())
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([2, 9, 4]))
    data = load_dataset(f"fashion-mnist:{tmp_path}", "train")
    np.testing.assert_array_equal(data.images[..., 0], images)
    assert data.labels.tolist() == [2, 9, 4] and data.classes[2] == "Pullover"
    with pytest.raises(DatasetError, match="fashion-mnist folder .*missing does not exist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'missing'}", "train")
    with pytest.raises(DatasetError, match="t10k"):
        load_dataset(f"fashion-mnist:{tmp_path}", "test")
