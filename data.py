"""
Image datasets for training vector-quantized autoencoders.

get_dataset(name, split, data_dir, image_size, channels) returns a torch Dataset whose items
are float32 tensors of shape (C, H, W) scaled to [-1, 1], without labels; C = channels, 1
(grayscale) or 3 (RGB), by default the dataset's own (DATASETS).
get_labels(name, split, data_dir) returns their class labels, in the same order, for
the labelled datasets (mnist, fashion_mnist, cifar10), and None for the others.

- shapes: coloured shapes on gradient backgrounds, rendered on the fly (no files needed)
- mnist, fashion_mnist: IDX files, as published
- cifar10: the "python version" pickled batches, as published
- celeba: aligned-and-cropped JPEGs plus the official partition file
- lsun_church, imagenet, folder: plain folders of image files

Image files are decoded whole when read, so a truncated or corrupt one fails there; with
skip_unreadable, such a file is named on stderr and its item is None, which collate_readable
leaves out of the batch. A palette, RGBA, CMYK, 16-bit or colour-to-grayscale conversion is
said once per kind on stderr.

download(name, data_dir) fetches MNIST, Fashion-MNIST and CIFAR-10; the others must
be obtained by hand. Every bad or missing input raises DataError, whose message names
the file or folder and what was expected.
"""

import gzip
import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# name -> (channels, native/default image_size)
DATASETS = {
    "shapes": (3, 32),
    "mnist": (1, 28),
    "fashion_mnist": (1, 28),
    "cifar10": (3, 32),
    "celeba": (3, 64),
    "lsun_church": (3, 128),
    "imagenet": (3, 256),
    "folder": (3, 64),
}
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(RuntimeError):
    """A dataset file or folder is missing or malformed."""


def to_tensor(image, mode="RGB"):
    """PIL image -> float32 (C, H, W) tensor in [-1, 1], converted to `mode` ("L" or "RGB") first."""
    image = image.convert(mode) if image.mode != mode else image
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1.0


def get_dataset(name, split, data_dir=None, image_size=None, channels=None, skip_unreadable=False):
    """The `split` ("train", "val" or "test") of dataset `name`, see DATASETS, as `channels`-channel images (1 or 3;
    default: the dataset's). With skip_unreadable, an image file that cannot be decoded gives None (see
    collate_readable) instead of raising DataError."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    size = DATASETS[name][1] if image_size is None else image_size
    if not isinstance(size, int) or size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    mode = {1: "L", 3: "RGB"}.get(DATASETS[name][0] if channels is None else channels)
    if mode is None:
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    dataset = open_dataset(name, split, data_dir, size)
    dataset.mode, dataset.skip_unreadable = mode, skip_unreadable
    return dataset


def open_dataset(name, split, data_dir, size):
    if name == "shapes":
        return Shapes(split, size)
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs data_dir, the folder holding its files "
                        "(only 'shapes' works without one)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data_dir for {name!r} is not a directory")
    if name in ("mnist", "fashion_mnist"):
        return mnist(name, root, split, size)
    if name == "cifar10":
        return cifar10(root, split, size)
    if name == "celeba":
        return celeba(root, split, size)
    return image_folder(name, root, split, size)


def get_labels(name, split, data_dir=None):
    """Class labels, int64 (N,), of get_dataset(name, split, data_dir)'s images in the same order; None for a
    dataset without labels, and for MNIST-style files without their label files beside them."""
    if name not in ("mnist", "fashion_mnist", "cifar10") or data_dir is None:
        return None
    root = Path(data_dir)
    if name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return np.concatenate([read_cifar_batch(root / "cifar-10-batches-py" / n, "labels") for n in names])
    stem = "train-labels-idx1-ubyte" if split == "train" else "t10k-labels-idx1-ubyte"
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return read_idx(path, 2049, 1).astype(np.int64)
    return None


def collate_readable(items):
    """A DataLoader's collate_fn for datasets made with skip_unreadable: stacks the items that are not None (the
    unreadable images), so a batch may come out smaller than asked; an empty (0,) tensor when none could be read."""
    kept = [item for item in items if item is not None]
    return torch.utils.data.default_collate(kept) if kept else torch.empty(0)

# -----------------------------------------------------------------------------
# shapes: the embedded default, small enough for a conv autoencoder to learn on a CPU

class Shapes(Dataset):
    """1-3 solid ellipses, rectangles and triangles on a linear gradient, seeded by index."""

    LENGTHS = {"train": 20_000, "val": 1_000, "test": 1_000}
    mode = "RGB"  # get_dataset sets the one asked for
    # seeds come from disjoint ranges, so no image appears in two splits
    SEED_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}

    def __init__(self, split, image_size):
        self.split, self.image_size = split, image_size

    def __len__(self):
        return self.LENGTHS[self.split]

    def __getitem__(self, index):
        index = range(len(self))[index]  # IndexError past the end, which ends iteration
        rng = np.random.default_rng(self.SEED_OFFSETS[self.split] + index)
        return to_tensor(render_shapes(rng, self.image_size), self.mode)


def render_shapes(rng, size, supersample=2):
    """Draw at `supersample` times the size, then box-filter down, which antialiases the edges."""
    canvas = size * supersample
    image = Image.fromarray(gradient(rng, canvas))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(3)
        w, h = rng.uniform(1 / 4, 2 / 3, size=2) * canvas
        x, y = rng.uniform(w / 2, canvas - w / 2), rng.uniform(h / 2, canvas - h / 2)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if kind == 0:
            draw.ellipse((x - w / 2, y - h / 2, x + w / 2, y + h / 2), fill=color)
        elif kind == 1:
            draw.rectangle((x - w / 2, y - h / 2, x + w / 2, y + h / 2), fill=color)
        else:  # a randomly rotated triangle inscribed in the w x h ellipse
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
            points = zip(x + w / 2 * np.cos(angles), y + h / 2 * np.sin(angles))
            draw.polygon([(float(px), float(py)) for px, py in points], fill=color)
    return image.resize((size, size), Image.Resampling.BOX)


def gradient(rng, size):
    """A size x size uint8 RGB image blending between two random colours in a random direction."""
    start, end = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = np.cos(angle), np.sin(angle)
    coords = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    # projection onto the direction, rescaled so the image corners reach 0 and 1
    t = 0.5 + (coords[None, :] * dx + coords[:, None] * dy) / (abs(dx) + abs(dy))
    return (start + t[:, :, None] * (end - start)).astype(np.uint8)

# -----------------------------------------------------------------------------
# datasets that fit in memory as one uint8 array: MNIST, Fashion-MNIST, CIFAR-10

class ArrayImages(Dataset):
    """Images held as a uint8 array (N, H, W) or (N, H, W, C), resized and converted one at a time."""

    mode = "RGB"  # get_dataset sets the one asked for

    def __init__(self, images, image_size):
        self.images, self.image_size = images, image_size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return to_tensor(image, self.mode)


def mnist(name, root, split, size):
    # MNIST and Fashion-MNIST have no validation split, so "val" and "test" are both the test set
    stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return ArrayImages(read_idx_images(path), size)
    raise DataError(f"{root / stem}[.gz] not found; {name} expects train-images-idx3-ubyte[.gz] "
                    f"and t10k-images-idx3-ubyte[.gz] directly in {root}")


def read_idx_images(path):
    """An IDX image file (plain or gzip) -> uint8 array (N, rows, cols)."""
    return read_idx(path, 2051, 3)


def read_idx(path, magic, ndim):
    """An IDX file of uint8 values (plain or gzip), images (magic 2051, 3 dims) or labels (2049, 1 dim) -> uint8
    array of `ndim` dims."""
    kind = "image" if magic == 2051 else "label"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if raw[:4] != magic.to_bytes(4, "big"):
        raise DataError(f"{path} is not an IDX {kind} file (magic 0x{raw[:4].hex()}, "
                        f"expected 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: expected a {header}-byte header, found {len(raw)} bytes")
    shape = [int(v) for v in np.frombuffer(raw, ">i4", count=ndim, offset=4)]
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "too long"
        raise DataError(f"{path} is {problem}: expected {expected} bytes, found {len(raw)}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def cifar10(root, split, size):
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for path in (folder / name for name in names):
        if not path.is_file():
            raise DataError(f"{path} not found; CIFAR-10 expects {folder}/data_batch_1 .. "
                            "data_batch_5 and test_batch (the python version, extracted)")
    # CIFAR-10 has no validation split either: "val" and "test" are both the test batch
    data = np.concatenate([read_cifar_batch(folder / name) for name in names])
    # each row holds the R, G and B planes of a 32x32 image, one after the other
    return ArrayImages(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), size)


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused,
    since unpickling an arbitrary global can run arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles made with numpy < 2
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path, key="data"):
    """A CIFAR-10 python batch -> its images, uint8 array (N, 3072), or with key "labels" its labels, int64 (N,)."""
    try:
        with open(path, "rb") as f:
            # the batches were pickled by Python 2: its str keys come back as bytes
            batch = NumpyUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a damaged pickle can fail in many ways, all meaning "not a batch"
        raise DataError(f"{path}: not a CIFAR-10 batch: {err}") from err
    value = batch.get(key.encode()) if isinstance(batch, dict) else None
    if key == "labels":
        labels = np.asarray(value) if isinstance(value, list) else None
        if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{path}: expected a dict whose b'labels' is a list of integers, found {type(value)}")
        return labels.astype(np.int64)
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint8
            and value.ndim == 2 and value.shape[1] == 3072):
        found = f"{value.dtype} array {value.shape}" if isinstance(value, np.ndarray) else type(value)
        raise DataError(f"{path}: expected a dict whose b'data' is a uint8 array of shape "
                        f"(N, 3072), found {found}")
    return value

# -----------------------------------------------------------------------------
# datasets of image files, decoded one at a time

class ImageFiles(Dataset):
    """Image files, decoded to `mode` ("RGB" or "L") and passed through transform(image, image_size). `note`, when
    set, says something the user should know about where the images come from."""

    mode, skip_unreadable = "RGB", False  # get_dataset sets the ones asked for

    def __init__(self, paths, image_size, transform, note=None):
        self.paths, self.image_size, self.transform, self.note = paths, image_size, transform, note

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = load_image(self.paths[index], self.mode)
        except DataError as err:
            if not self.skip_unreadable:
                raise
            print(f"warning: skipped {err}", file=sys.stderr, flush=True)
            return None
        return to_tensor(self.transform(image, self.image_size), self.mode)


CONVERSIONS = {  # PIL modes that lose something on the way to L or RGB: what is done, said once per kind
    "P": "its palette's colours are used",
    "PA": "its palette's colours are used, the alpha channel dropped",
    "RGBA": "the alpha channel is dropped (not composited)",
    "LA": "the alpha channel is dropped",
    "CMYK": "PIL's formula converts it, without a colour profile",
    "I;16": "its 16-bit values are scaled to 8 bits",
    "I": "its 32-bit integer values are read as 16-bit and scaled to 8 bits",
}
conversions_said = set()  # the kinds of conversion already said in this process


def load_image(path, mode="RGB"):
    """Decode the whole file now, so that a truncated or corrupt image fails here; returns a PIL image in `mode`."""
    try:
        with Image.open(path) as image:
            image.load()
            found = "I;16" if image.mode.startswith("I;16") else image.mode
            notes = [CONVERSIONS[found]] if found in CONVERSIONS else []
            if found in ("I;16", "I"):  # convert() would clip each value to 255, not scale it
                image = Image.fromarray(np.round(np.asarray(image, np.float64).clip(0, 65535) / 257).astype(np.uint8))
            if mode == "L" and image.mode not in ("L", "1"):
                notes.append("its colours are made gray (ITU-R 601 luma)")
            if notes and (found, mode) not in conversions_said:
                conversions_said.add((found, mode))
                print(f"note: {path} is a {found} image, read as {mode}: {'; '.join(notes)} "
                      "(said once per kind)", file=sys.stderr, flush=True)
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image: {err}") from err


def input_transform(name):
    """How dataset `name` brings a decoded image file to image_size x image_size (eval.py --images uses it on any
    image): celeba's face crop, and for every other dataset resize_center_crop."""
    return celeba_transform if name == "celeba" else resize_center_crop


def center_crop(image, size):
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def celeba_transform(image, size):
    # the usual CelebA recipe: keep the central 140x140 face region, then resize
    return center_crop(image, 140).resize((size, size), Image.Resampling.BICUBIC)


def resize_center_crop(image, size):
    """Scale the shorter side to `size`, then take the central size x size square."""
    scale = size / min(image.size)
    width, height = (max(size, round(side * scale)) for side in image.size)
    return center_crop(image.resize((width, height), Image.Resampling.BICUBIC), size)


def celeba(root, split, size):
    images, partition = root / "img_align_celeba", root / "list_eval_partition.txt"
    for path in (images, partition):
        if not path.exists():
            raise DataError(f"{path} not found; CelebA expects {images}/*.jpg "
                            f"and {partition}")
    wanted = {"train": "0", "val": "1", "test": "2"}[split]
    paths = []
    for number, line in enumerate(partition.read_text().splitlines(), start=1):
        fields = line.split()
        if fields and (len(fields) != 2 or fields[1] not in ("0", "1", "2")):
            raise DataError(f"{partition}, line {number}: expected '<image>.jpg <0|1|2>', "
                            f"found {line!r}")
        if fields and fields[1] == wanted:
            paths.append(images / fields[0])
    if not paths:
        raise DataError(f"{partition} lists no images for split {split!r} (partition {wanted})")
    return ImageFiles(paths, size, celeba_transform)


def image_folder(name, root, split, size):
    candidates = [root / split] + ([root / "valid", root / "test"] if split == "val" else [])
    split_dirs = [d for d in candidates if d.is_dir()]
    has_split_dirs = any((root / d).is_dir() for d in ("train", "val", "valid", "test"))
    note = None
    if split_dirs:
        paths = list_images(split_dirs[0])
        if split_dirs[0].name == "test":  # train/ and test/ only: validate on test/, as for MNIST
            note = f"{root} has no val/: validating on {split_dirs[0]}"
    elif has_split_dirs or name == "imagenet":
        layout = "train/ and val/" if name == "imagenet" else "train/, val/ and test/"
        raise DataError(f"{candidates[0]} not found; {name} expects image files in "
                        f"{root}/{layout} (subfolders allowed)")
    else:
        # no split folders: hold out every 20th image in sorted order;
        # "val" and "test" are then the same held-out images
        held_out = split != "train"
        paths = [p for i, p in enumerate(list_images(root)) if (i % 20 == 0) == held_out]
    if not paths:
        folder = split_dirs[0] if split_dirs else root
        raise DataError(f"{folder}: no images for split {split!r} (searched subfolders too "
                        f"for files ending in {' '.join(IMAGE_EXTENSIONS)}, any case)")
    return ImageFiles(paths, size, resize_center_crop, note)


def list_images(folder):
    """All image files under folder, recursively, in sorted order."""
    # sorted as strings: the order of Path objects has changed between Python versions
    return sorted(str(p) for p in Path(folder).rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

# -----------------------------------------------------------------------------
# downloads

DOWNLOADS = {  # name -> [(url, md5)], checksums as published with the datasets
    "mnist": [
        ("https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
         "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
         "9fb629c4189551a2d022fa330f9573f3"),
    ],
    "fashion_mnist": [
        ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
         "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
         "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ],
    "cifar10": [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
         "c58f30108f718f92721af3b95e74349a"),
    ],
}


def download(name, data_dir):
    """Fetch the files of `name` into data_dir, in the layout get_dataset expects."""
    if name not in DOWNLOADS:
        raise DataError(f"cannot download {name!r}: only {', '.join(DOWNLOADS)} can be "
                        "downloaded; get the others by hand (see get_dataset)")
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    for url, md5 in DOWNLOADS[name]:
        path = root / url.rsplit("/", 1)[1]
        if not checksum_ok(path, md5):
            fetch(url, path, md5)
    if name == "cifar10":
        with tarfile.open(root / "cifar-10-python.tar.gz", "r:gz") as archive:
            archive.extractall(root, filter="data")  # refuses links and paths leaving root


def fetch(url, path, md5):
    """Download to a temporary file and rename it only once its checksum is right,
    so an interrupted download never leaves a half-written file under the real name."""
    print(f"downloading {url} to {path}")
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        if not checksum_ok(partial, md5):
            raise DataError(f"{url}: downloaded file does not match md5 {md5}")
        os.replace(partial, path)
    except OSError as err:  # URLError, timeouts, a full disk
        raise DataError(f"{url}: download to {path} failed: {err}") from err
    finally:
        partial.unlink(missing_ok=True)


def checksum_ok(path, expected, algorithm="md5"):
    """Whether the file exists and its hex digest under `algorithm` (md5, sha256) is `expected`."""
    if not Path(path).is_file():
        return False
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest() == expected.lower()
