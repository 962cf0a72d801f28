"""
Tests for data.py. Every dataset is faked with small files written to tmp_path,
so no real dataset and no network is needed.
"""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, get_dataset


def expected(pixels):
    """The [-1, 1] tensor for uint8 pixels (H, W) or (H, W, C), computed independently."""
    array = np.asarray(pixels, dtype=np.float64)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.tensor(array / 127.5 - 1, dtype=torch.float32)

# -----------------------------------------------------------------------------
# shapes

def test_shapes_is_deterministic_per_index():
    a, b = get_dataset("shapes", "train"), get_dataset("shapes", "train")
    for i in (0, 7, 19_999):
        assert torch.equal(a[i], b[i])
    assert not torch.equal(a[0], a[1])


def test_shapes_splits_differ():
    train, val, test = (get_dataset("shapes", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (20_000, 1_000, 1_000)
    for i in range(5):
        assert not torch.equal(train[i], val[i])
        assert not torch.equal(val[i], test[i])


def test_shapes_items_are_images_in_range():
    shapes = get_dataset("shapes", "val")
    for i in range(20):
        x = shapes[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        levels = (x + 1) * 127.5  # must be whole uint8 levels
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert x.std() > 0.05, "constant image"
    with pytest.raises(IndexError):
        shapes[1_000]


def test_shapes_honours_image_size():
    assert get_dataset("shapes", "train", image_size=48)[3].shape == (3, 48, 48)
    big = get_dataset("shapes", "train", image_size=64)[3]
    small = get_dataset("shapes", "train", image_size=32)[3]
    # the same scene at two resolutions: 2x2 averages of the big one match the small one
    pooled = torch.nn.functional.avg_pool2d(big[None], 2)[0]
    assert (pooled - small).abs().mean() < 0.05

# -----------------------------------------------------------------------------
# MNIST and Fashion-MNIST

def write_idx(path, pixels, magic=2051, count=None):
    """An IDX image file; `count` may claim more images than `pixels` holds."""
    n, rows, cols = pixels.shape
    raw = struct.pack(">iiii", magic, n if count is None else count, rows, cols)
    raw += pixels.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_pixels(tmp_path, name, suffix):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(3, 28, 28))
    train[0, 0, :3] = [0, 255, 128]
    test = rng.integers(0, 256, size=(2, 28, 28))
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test)

    ds = get_dataset(name, "train", tmp_path)
    assert len(ds) == 3
    assert ds[0].shape == (1, 28, 28) and ds[0].dtype == torch.float32
    assert ds[0][0, 0, :3].tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]
    for i in range(3):
        assert torch.allclose(ds[i], expected(train[i]), atol=1e-6)
    for split in ("val", "test"):  # both are the t10k file
        ds = get_dataset(name, split, tmp_path)
        assert len(ds) == 2 and torch.allclose(ds[1], expected(test[1]), atol=1e-6)


def test_mnist_resize(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.full((1, 28, 28), 200))
    x = get_dataset("mnist", "train", tmp_path, image_size=14)[0]
    assert x.shape == (1, 14, 14)
    assert torch.allclose(x, torch.full((1, 14, 14), 200 / 127.5 - 1), atol=1e-6)


def test_mnist_bad_files(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28)), magic=2049)  # the magic of a label file
    with pytest.raises(DataError, match="not an IDX image file") as err:
        get_dataset("mnist", "train", tmp_path)
    assert str(path) in str(err.value)

    write_idx(path, np.zeros((2, 28, 28)), count=3)
    with pytest.raises(DataError, match=f"truncated: expected {16 + 3 * 784} bytes, "
                                        f"found {16 + 2 * 784}") as err:
        get_dataset("mnist", "train", tmp_path)
    assert str(path) in str(err.value)

    path.unlink()
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError) as err:
        get_dataset("mnist", "train", tmp_path)
    assert str(gz) in str(err.value)


def test_mnist_missing_file(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        get_dataset("fashion_mnist", "test", tmp_path)

# -----------------------------------------------------------------------------
# CIFAR-10

class Python2Pickler(pickle._Pickler):
    """Writes strings and bytes the way Python 2 pickled str, as the real batches were made."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        obj = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    dispatch[str] = dispatch[bytes] = save_py2_str


def python2_pickle(obj):
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy 1.x, which made the real files, lived under numpy.core
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(root, n_train=2, n_test=3):
    """Fake batches of random images; returns {file name: uint8 data (N, 3072)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": n_train for i in range(1, 6)} | {"test_batch": n_test}
    written = {}
    for name, n in batches.items():
        written[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": [1] * n, "data": written[name]}
        if name == "data_batch_1":
            (folder / name).write_bytes(python2_pickle(batch))
        else:  # a Python 3 pickle, keys as bytes like encoding="bytes" reads them
            batch = {key.encode(): value for key, value in batch.items()}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return written


def test_cifar_planes_and_splits(tmp_path):
    batches = write_cifar(tmp_path)
    # the pixel at row 1, column 2: its R, G and B values sit 1024 bytes apart
    batches["test_batch"][0, [0 * 1024 + 34, 1 * 1024 + 34, 2 * 1024 + 34]] = [200, 100, 50]
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": batches["test_batch"], b"labels": [0, 0, 0]}))

    train = get_dataset("cifar10", "train", tmp_path)
    assert len(train) == 10
    assert len(get_dataset("cifar10", "val", tmp_path)) == 3
    test = get_dataset("cifar10", "test", tmp_path)
    assert len(test) == 3
    x = test[0]
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 1, 2], expected([[[200, 100, 50]]])[:, 0, 0])
    # the whole layout, against an independent decode of one image from each kind of pickle
    for i, raw in ((0, batches["data_batch_1"][0]), (9, batches["data_batch_5"][1])):
        rgb = np.stack([raw[c * 1024:(c + 1) * 1024].reshape(32, 32) for c in range(3)], -1)
        assert torch.allclose(train[i], expected(rgb), atol=1e-6)
    assert get_dataset("cifar10", "train", tmp_path, image_size=16)[0].shape == (3, 16, 16)


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_refuses_malicious_pickle(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": RunsACommand(f"touch {marker}")})
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(payload)

    with pytest.raises(DataError, match="system") as err:
        get_dataset("cifar10", "train", tmp_path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    pickle.loads(payload)  # the payload does run the command when unpickled normally
    assert marker.exists()


def test_cifar_bad_batches(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.float32)}))
    with pytest.raises(DataError, match="uint8") as err:
        get_dataset("cifar10", "test", tmp_path)
    assert str(path) in str(err.value)

    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch"):
        get_dataset("cifar10", "test", tmp_path)

    path.unlink()
    with pytest.raises(DataError, match="test_batch"):
        get_dataset("cifar10", "val", tmp_path)

# -----------------------------------------------------------------------------
# CelebA

def write_celeba(root, partitions=(0, 0, 0, 1, 1, 2)):
    """178x218 JPEGs like the real ones: red, with the central 140x140 box blue."""
    (root / "img_align_celeba").mkdir()
    lines = []
    for i, part in enumerate(partitions, start=1):
        image = np.zeros((218, 178, 3), np.uint8)
        image[:, :] = [255, 0, 0]
        image[39:179, 19:159] = [0, 0, 255]  # (218 - 140) / 2 = 39, (178 - 140) / 2 = 19
        path = root / "img_align_celeba" / f"{i:06d}.jpg"
        Image.fromarray(image).save(path, quality=100, subsampling=0)
        lines.append(f"{path.name} {part}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_splits_and_crop(tmp_path):
    write_celeba(tmp_path)
    sizes = [len(get_dataset("celeba", s, tmp_path)) for s in ("train", "val", "test")]
    assert sizes == [3, 2, 1]

    x = get_dataset("celeba", "val", tmp_path)[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    # only the blue centre is kept: no red anywhere, including the edges
    assert (x[0] < -0.8).all() and (x[2] > 0.8).all()

    # at 140 pixels there is no resize: exactly the central box of the decoded JPEG
    decoded = np.asarray(Image.open(tmp_path / "img_align_celeba" / "000004.jpg").convert("RGB"))
    x = get_dataset("celeba", "val", tmp_path, image_size=140)[0]
    assert torch.allclose(x, expected(decoded[39:179, 19:159]), atol=1e-6)


def test_celeba_missing_files(tmp_path):
    with pytest.raises(DataError, match="img_align_celeba"):
        get_dataset("celeba", "train", tmp_path)
    write_celeba(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt"):
        get_dataset("celeba", "train", tmp_path)

# -----------------------------------------------------------------------------
# folders of images

def test_folder_holdout(tmp_path):
    # 45 images whose red channel identifies them, some in a subfolder, some in odd case
    (tmp_path / "sub").mkdir()
    for i in range(45):
        folder = tmp_path / ("sub" if i >= 30 else "")
        suffix = ".PNG" if i % 7 == 0 else ".png"
        Image.new("RGB", (12, 10), (i * 5, 7, 9)).save(folder / f"img_{i:03d}{suffix}")
    (tmp_path / "notes.txt").write_text("not an image")

    def ids(split):
        ds = get_dataset("folder", split, tmp_path, image_size=8)
        assert ds[0].shape == (3, 8, 8)
        return [round((ds[i][0, 0, 0].item() + 1) * 127.5 / 5) for i in range(len(ds))]

    train, val, test = ids("train"), ids("val"), ids("test")
    assert (len(train), len(val)) == (42, 3)
    assert val == test  # without split folders, val and test are the same held-out images
    assert sorted(train + val) == list(range(45))


def test_folder_split_dirs(tmp_path):
    for split, n in (("train", 3), ("valid", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.new("RGB", (80, 40), (i, 0, 0)).save(tmp_path / split / f"{i}.jpg")
    assert len(get_dataset("lsun_church", "train", tmp_path)) == 3
    val = get_dataset("imagenet", "val", tmp_path, image_size=32)
    assert len(val) == 2 and val[0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="test"):
        get_dataset("folder", "test", tmp_path)


def test_resize_then_center_crop(tmp_path):
    # 120x60, left third red, middle third green, right third blue: the crop keeps only green
    image = np.zeros((60, 120, 3), np.uint8)
    image[:, :40, 0] = image[:, 40:80, 1] = image[:, 80:, 2] = 255
    Image.fromarray(image).save(tmp_path / "a.png")
    x = get_dataset("folder", "val", tmp_path, image_size=30)[0]  # a lone image is held out
    assert x.shape == (3, 30, 30)
    # the shorter side is scaled from 60 to 30, so the 40-wide green band becomes 20 wide,
    # centred in the 30-wide crop: red and blue only show in the 5 columns on either side
    assert (x[1, :, 7:23] > 0.95).all()
    assert (x[0, :, 7:23] < -0.95).all() and (x[2, :, 7:23] < -0.95).all()
    assert (x[0, :, 0] > 0.5).all() and (x[2, :, -1] > 0.5).all()


@pytest.mark.parametrize("format, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image(tmp_path, format, suffix):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=format)
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    ds = get_dataset("folder", "val", tmp_path)  # reading happens per item, not here
    with pytest.raises(DataError, match="cannot read image") as err:
        ds[0]
    assert str(path) in str(err.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"\.jpg") as err:
        get_dataset("folder", "train", tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="train"):  # imagenet needs split folders
        get_dataset("imagenet", "train", tmp_path)

# -----------------------------------------------------------------------------
# arguments

def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'svhn'.*cifar10.*lsun_church"):
        get_dataset("svhn", "train")
    with pytest.raises(DataError, match="unknown split 'validation'.*train, val, test"):
        get_dataset("shapes", "validation")
    with pytest.raises(DataError, match="data_dir"):
        get_dataset("mnist", "train")
    with pytest.raises(DataError, match="not a directory") as err:
        get_dataset("cifar10", "train", tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    with pytest.raises(DataError, match="image_size"):
        get_dataset("shapes", "train", image_size=0)


def test_datasets_table():
    # other modules size their models from this table
    assert data.DATASETS == {
        "shapes": (3, 32), "mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32),
        "celeba": (3, 64), "lsun_church": (3, 128), "imagenet": (3, 256), "folder": (3, 64),
    }
    assert get_dataset("shapes", "test")[0].shape == (3, 32, 32)

# -----------------------------------------------------------------------------
# downloads (without the network)

def test_checksum_ok(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    assert data.checksum_ok(path, "b1946ac92492d2347c6235b4d2611184")
    assert data.checksum_ok(path, "B1946AC92492D2347C6235B4D2611184")
    assert not data.checksum_ok(path, "b1946ac92492d2347c6235b4d2611185")
    sha256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert data.checksum_ok(path, sha256, "sha256")
    assert not data.checksum_ok(path, "0" * 64, "sha256")
    assert not data.checksum_ok(tmp_path / "missing.txt", "b1946ac92492d2347c6235b4d2611184")


def test_fetch_verifies_before_renaming(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"hello\n"))
    path = tmp_path / "file.gz"
    with pytest.raises(DataError, match="md5"):
        data.fetch("https://example.org/file.gz", path, "0" * 32)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one is left
    data.fetch("https://example.org/file.gz", path, "b1946ac92492d2347c6235b4d2611184")
    assert path.read_bytes() == b"hello\n" and list(tmp_path.iterdir()) == [path]


def test_download_skips_verified_files_and_extracts(tmp_path, monkeypatch):
    # a local stand-in for the CIFAR-10 archive, already present with the right checksum
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", [(f"https://example.org/{archive.name}", md5)])
    monkeypatch.setattr(data, "fetch", lambda *args: pytest.fail("fetched a verified file"))
    data.download("cifar10", tmp_path)
    assert (tmp_path / "cifar-10-batches-py" / "readme.html").read_bytes() == b"hello"
    with pytest.raises(DataError, match="celeba"):
        data.download("celeba", tmp_path)


# -----------------------------------------------------------------------------
# labels, for classification from codes

def test_mnist_labels_follow_the_images(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    assert data.get_labels("mnist", "train", tmp_path) is None  # images without labels: nothing to classify
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, 3) + bytes([7, 0, 9]))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">ii", 2049, 2) + bytes([1, 2])))
    labels = data.get_labels("mnist", "train", tmp_path)
    assert labels.tolist() == [7, 0, 9] and labels.dtype == np.int64
    assert data.get_labels("fashion_mnist", "test", tmp_path).tolist() == [1, 2]
    assert data.get_labels("mnist", "val", tmp_path).tolist() == [1, 2]  # val is the t10k file, as for the images
    assert data.get_labels("shapes", "train") is None
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, 4) + bytes([7, 0, 9]))
    with pytest.raises(DataError, match="truncated: expected 12 bytes, found 11"):
        data.get_labels("mnist", "train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2051, 3) + bytes([7, 0, 9]))
    with pytest.raises(DataError, match="not an IDX label file"):
        data.get_labels("mnist", "train", tmp_path)


def test_cifar_labels_follow_the_images(tmp_path):
    write_cifar(tmp_path)  # every written label is 1
    folder = tmp_path / "cifar-10-batches-py"
    test = np.zeros((3, 3072), np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": test, b"labels": [4, 0, 9]}))
    assert data.get_labels("cifar10", "test", tmp_path).tolist() == [4, 0, 9]
    assert data.get_labels("cifar10", "train", tmp_path).tolist() == [1] * 10
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": test}))
    with pytest.raises(DataError, match="labels"):
        data.get_labels("cifar10", "test", tmp_path)
