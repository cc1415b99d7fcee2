"""Image folders: ``<root>/<domain>/<class>/<image>``, any format PIL reads.

Class splits come from an optional JSON splits file::

    {"<domain>": {"train": ["class", ...], "val": [...], "test": [...]},
     "<ood domain>": {"test": "all"}}

Domains missing from it are split at random by ``fractions`` with ``seed``.
Domain and class names are in Unicode normal form C, so a splits file or a
config typed on one system finds the folders that another wrote ("café"
composed or decomposed, as macOS stores it).

Images are decoded lazily and near the size they are used at, so that memory
stays bounded: JPEGs in draft mode (decoded at 1/2 … 1/8 scale), other
formats shrunk by an integer factor (``Image.reduce``) right after decoding,
to a short side of at least ``size_hint`` (default ``DECODE_SIZE``) times
two. An image of more than ``max_pixels`` pixels (default ``MAX_PIXELS``,
2^27 ≈ 11585², below Pillow's decompression-bomb limit) is not decoded at
all: like a damaged file it is skipped with a warning and counted. 16-bit,
32-bit and float images (scans, microscopy) become 8-bit (:func:`to_8bit`);
EXIF orientation (photos from phones) is applied.
"""

from __future__ import annotations

import json
import struct
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .source import SPLITS, DataError, DataNotFoundError, Domain, Source, UnreadableImageError

LAYOUT = "<root>/<domain>/<class>/<image> (e.g. root/birds/cardinal/001.jpg)"
# The model input size assumed when the caller gives no size_hint: the largest
# of the usual ViTs'. Images are decoded at twice it, so a crop keeps its detail.
DECODE_SIZE = 384
# Decoding an image takes up to 4 bytes per pixel (Pillow's RGB): 2^27 pixels
# bound one decode to 512 MiB.
MAX_PIXELS = 2**27


# Formats Pillow registers but cannot decode here: save-only, identify-only stubs, or an outside program.
NOT_DECODED = {"BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "PALM", "PDF", "WMF"}
# Modes of more than 8 bits per channel, which Image.reduce and convert("RGB") cannot take as they are.
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def image_extensions() -> set[str]:
    """The file extensions of the formats Pillow decodes (a .pdf or .h5 in a class folder is not an image)."""
    Image.init()
    return {ext.lower() for ext, kind in Image.registered_extensions().items()
            if (kind in Image.OPEN or kind == "MPO") and kind not in NOT_DECODED}


def is_image_file(path: Path, extensions: set[str]) -> bool:
    """A file with an image extension that is not hidden (macOS's ``._x.jpg`` twins, ``.DS_Store``)."""
    return path.suffix.lower() in extensions and not path.name.startswith(".") and path.is_file()


def to_8bit(image: Image.Image) -> Image.Image:
    """An image of a mode wider than 8 bits as 8-bit greyscale ("L"); other images unchanged.

    Values that already fit 0–255, and floats in [0, 1], keep their scale; anything wider is stretched from
    0 (or its minimum, where negative) to its maximum, as image viewers show 12- and 16-bit scans."""
    if image.mode not in WIDE_MODES:
        return image
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = min(float(values.min(initial=0.0)), 0.0), float(values.max(initial=0.0))
    if image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    elif low < 0 or high > 255:
        values = (values - low) * (255 / (high - low))
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")


def random_class_split(num_classes: int, fractions, seed: int | str) -> dict[str, list[int]]:
    """Seeded class split by fractions (train, val, test); val and test get at least one class."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three numbers (train, val, test) summing to 1, got {fractions}")
    order = np.random.default_rng(_seed_of(seed)).permutation(num_classes).tolist()
    n_val = max(1, round(fractions[1] * num_classes)) if fractions[1] > 0 else 0
    n_test = max(1, round(fractions[2] * num_classes)) if fractions[2] > 0 else 0
    n_train = num_classes - n_val - n_test
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def _seed_of(seed: int | str) -> int:
    return zlib.crc32(seed.encode()) if isinstance(seed, str) else int(seed)


class FolderDomain(Domain):
    def __init__(self, name: str, directory: Path, class_dirs: list[Path], files: list[list[Path]], splits,
                 size_hint: int | None, max_pixels: int = MAX_PIXELS):
        super().__init__(nfc(name), [nfc(d.name) for d in class_dirs], splits)
        self.directory, self.files, self.size_hint = directory, files, size_hint
        self.max_pixels = max_pixels

    def num_items(self, class_index: int) -> int:
        return len(self.files[class_index])

    def describe(self, class_index: int, item: int) -> str:
        return str(self.files[class_index][item])

    def load(self, class_index: int, item: int) -> np.ndarray:
        return decode_image(self.files[class_index][item], self.size_hint or DECODE_SIZE, self.max_pixels)


def decode_image(path: Path, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 H×W×3 with a short side of at least 2·``size`` where the file has
    that many pixels, decoded without ever holding the full-size RGB copies.
    Raises UnreadableImageError for an image of more than ``max_pixels``."""
    with warnings.catch_warnings():
        # smat's own limit (checked below, before any pixel is decoded) replaces Pillow's warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise UnreadableImageError(f"{path}: over Pillow's decompression-bomb limit ({error}); "
                                       f"shrink the image or remove it") from None
    with image:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise UnreadableImageError(f"{path}: {image.width}×{image.height} = {pixels} pixels is over the "
                                       f"limit of {max_pixels}; shrink the image or remove it")
        target = 2 * size
        orientation = exif_orientation(image)  # read first: draft, to_8bit and reduce drop it
        if image.mode in WIDE_MODES:
            image = to_8bit(image)
        else:  # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: less memory, and several times faster.
            image.draft("RGB", (target, target))
        factor = min(image.width, image.height) // target
        if factor >= 2:
            image = image.reduce(factor)
        return np.asarray(oriented(image, orientation).convert("RGB"))


ORIENTATION = 0x0112  # the EXIF tag: how the camera was held
TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1–8), or 1 where it has none or its EXIF block cannot be parsed (the
    pixels may still be fine)."""
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return 1
    return value if isinstance(value, int) else 1


def oriented(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned upright as its EXIF orientation says (as ``ImageOps.exif_transpose``)."""
    method = TRANSPOSES.get(orientation)
    return image if method is None else image.transpose(method)


class ImageFolderSource(Source):
    """Domains from ``<root>/<domain>/<class>/<image>``.

    root: the folder; splits_file: optional JSON as in the module docstring;
    fractions/seed: the random split of classes for domains not in it;
    domains: names to use (default: every sub-folder); size_hint: decode
    images near this size (set it to the model's image size; default
    ``DECODE_SIZE``); max_pixels: larger images are skipped and counted.
    """

    def __init__(self, root, splits_file=None, domains=None, fractions=(0.7, 0.15, 0.15), seed: int = 0,
                 size_hint: int | None = None, max_pixels: int = MAX_PIXELS):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"image folder root {root} does not exist; expected {LAYOUT}")
        splits = _read_splits(splits_file) if splits_file is not None else {}
        names = sorted(d.name for d in listing(root, "image folder root") if d.is_dir()
                       and not d.name.startswith("."))
        if domains is not None:
            on_disk = {nfc(name): name for name in names}
            missing = sorted(name for name in domains if nfc(name) not in on_disk)
            if missing:
                raise DataNotFoundError(f"domains {missing} not found under {root}; found {names}; "
                                        f"expected {LAYOUT}")
            names = [on_disk[nfc(name)] for name in domains]
        built = [self._domain(root / name, splits.get(nfc(name)), fractions, seed, size_hint, max_pixels)
                 for name in names]
        built = [domain for domain in built if domain is not None]
        if not built:
            raise DataNotFoundError(f"no domain with images under {root}; expected {LAYOUT}")
        super().__init__(built)

    @staticmethod
    def _domain(directory: Path, split_names, fractions, seed, size_hint, max_pixels):
        extensions = image_extensions()
        class_dirs, files = [], []
        for class_dir in sorted(d for d in listing(directory, "domain folder") if d.is_dir()
                                and not d.name.startswith(".")):
            images = sorted(f for f in listing(class_dir, "class folder") if is_image_file(f, extensions))
            if images:
                class_dirs.append(class_dir)
                files.append(images)
        if not class_dirs:
            return None
        names = [d.name for d in class_dirs]
        if split_names is None:
            splits = random_class_split(len(names), fractions, f"{seed}:{directory.name}")
        else:
            splits = _named_splits(directory, names, split_names)
        return FolderDomain(directory.name, directory, class_dirs, files, splits, size_hint, max_pixels)


def listing(directory: Path, what: str) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError as error:
        raise DataError(f"cannot read the {what} {directory} ({error.strerror or error}); make it readable "
                        f"(chmod u+rx) or move it out of the data root") from None


SPLITS_FORMAT = '{"<domain>": {"train": [classes], "val": [...], "test": [...]}}'


def _read_splits(path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"splits file {path} does not exist; expected JSON {SPLITS_FORMAT}")
    try:
        splits = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read the splits file {path} ({error}); expected JSON {SPLITS_FORMAT}") from None
    if not isinstance(splits, dict) or not all(isinstance(value, dict) for value in splits.values()):
        raise DataError(f"splits file {path} must map each domain to its splits: {SPLITS_FORMAT}")
    return {nfc(domain): value for domain, value in splits.items()}


def nfc(name):
    """``name`` in Unicode normal form C (composed), the form names are matched in; non-strings as given."""
    return unicodedata.normalize("NFC", name) if isinstance(name, str) else name


def _named_splits(directory: Path, names: list[str], split_names: dict) -> dict[str, list[int]]:
    index = {nfc(name): i for i, name in enumerate(names)}
    splits = {}
    for split, classes in split_names.items():
        if split not in SPLITS:
            raise DataError(f"splits file: domain {directory.name!r} has split {split!r}; use {SPLITS}")
        if classes == "all":
            classes = names
        if not isinstance(classes, list):
            raise DataError(f"splits file: split {split!r} of domain {directory.name!r} must be a list of class "
                            f"names or \"all\", got {classes!r}")
        missing = [c for c in classes if nfc(c) not in index]
        if missing:
            raise DataError(f"splits file names classes {missing[:5]} of domain {directory.name!r} "
                            f"that have no images under {directory}")
        splits[split] = [index[nfc(c)] for c in classes]
    return splits
