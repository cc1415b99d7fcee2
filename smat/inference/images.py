"""A user's images → the run's evaluation input: paths, PIL images, arrays or tensors, any size or mode.

Every image goes through the geometry of :class:`smat.data.transforms.EvalTransform` at the run's image
size (short side resized to size·146/128, centre crop, ImageNet normalisation). Greyscale, palette, RGBA,
16-bit and float images are converted to RGB (wide ones scaled to 8 bits), and photos are turned upright as
their EXIF orientation says. An image that cannot be read is skipped, and its name and the
reason are listed, never a crash. Folders are ``<class>/<image>``, as torchvision's ImageFolder has them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import DataError, EvalTransform
from ..data.folder import decode_image, exif_orientation, image_extensions, is_image_file, oriented, to_8bit
from ..data.loader import UNREADABLE
from ..data.transforms import center_box, crop_resize, normalize, to_tensor


@dataclass
class Prepared:
    """A batch of preprocessed images and what became of each input."""

    images: torch.Tensor  # fp32 [B, 3, size, size], normalised
    names: list[str]  # one per row of ``images``: the path, or "<input i>"
    kept: list[int]  # index in the input list of each row
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of inputs that were unreadable


def describe(item, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"<input {index}>"


def as_chw(item, size: int) -> torch.Tensor:
    """One image → fp32 [3, H, W] in [0, 1]. Paths are decoded near ``size`` (smat.data's decoder: pixel
    limit, JPEG draft mode); tensors are [H, W] or [C, H, W] (C = 1, 3 or 4), uint8 or float in [0, 1]."""
    if isinstance(item, (str, Path)):
        return to_tensor(decode_image(Path(item).expanduser(), size))
    if isinstance(item, Image.Image):
        return to_tensor(np.asarray(oriented(to_8bit(item), exif_orientation(item)).convert("RGB")))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"a numpy image must be uint8 H×W(×C); got dtype {item.dtype} (convert it, or pass a "
                             f"float tensor [3, H, W] in [0, 1])")
        return to_tensor(item)
    if isinstance(item, torch.Tensor):
        tensor = item.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be [H, W] or [C, H, W] with C = 1, 3 or 4; got "
                             f"{tuple(item.shape)}")
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        return tensor[:3].expand(3, -1, -1) if tensor.shape[0] == 1 else tensor[:3]
    raise TypeError(f"an image must be a path, a PIL image, a uint8 array or a tensor; got {type(item).__name__}")


def prepare(items, size: int) -> Prepared:
    """Preprocess ``items`` (a list of images, or one tensor [B, 3, H, W]) with the evaluation transform.

    Unreadable inputs are left out and listed in ``skipped``; nothing is raised for them."""
    if isinstance(items, torch.Tensor) and items.ndim == 4:
        items = list(items.unbind(0))
    if isinstance(items, (str, Path, Image.Image)) or (isinstance(items, torch.Tensor) and items.ndim < 4):
        items = [items]
    transform = EvalTransform(size)
    rows, names, kept, skipped = [], [], [], []
    for index, item in enumerate(items):
        name = describe(item, index)
        try:
            image = as_chw(item, size)
        except UNREADABLE as error:
            if not isinstance(item, (str, Path)):
                raise  # a tensor or array of the wrong shape is the caller's mistake, not a damaged file
            skipped.append((name, _reason(error)))
            continue
        box = center_box(image.shape[1], image.shape[2], transform.crop_fraction)
        rows.append(crop_resize(image, box, size))
        names.append(name)
        kept.append(index)
    images = normalize(torch.stack(rows)) if rows else torch.empty(0, 3, size, size)
    return Prepared(images, names, kept, skipped)


def _reason(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# --------------------------------------------------------------------------------- folders


def list_images(directory: Path) -> list[Path]:
    extensions = image_extensions()
    try:
        return sorted(f for f in directory.iterdir() if is_image_file(f, extensions))
    except OSError as error:
        raise DataError(f"cannot read {directory} ({error.strerror or error}); make it readable (chmod u+rx)") from None


def other_files(folders) -> str:
    """"; they hold 3 .heic file(s), …" for the files of ``folders`` (and their class folders) that are not
    images Pillow decodes here, so that a folder of iPhone photos is not reported as just empty."""
    extensions, found = image_extensions(), collections.Counter()
    try:
        for folder in map(lambda f: Path(f).expanduser(), folders):
            entries = [folder] if folder.is_file() else [*folder.iterdir(), *(
                f for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") for f in d.iterdir())]
            found.update(entry.suffix.lower() or "(no extension)" for entry in entries if entry.is_file()
                         and not entry.name.startswith(".") and entry.suffix.lower() not in extensions)
    except OSError:  # the caller's message stands without the hint
        return ""
    if not found:
        return ""
    shown = ", ".join(f"{count} {suffix}" for suffix, count in found.most_common(4))
    return (f"; they hold other files ({shown}) in a format Pillow cannot read here: convert them to JPEG or PNG "
            f"(HEIC: pip install pillow-heif and convert)")


def class_folders(root: str | Path) -> dict[str, list[Path]]:
    """{class name: image paths} of ``<root>/<class>/<image>``, classes sorted by name (empty ones too)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder of <class>/<image> (e.g. parts/bolt/001.jpg)")
    try:
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        return {folder.name: list_images(folder) for folder in folders}
    except OSError as error:
        raise DataError(f"cannot read {root} ({error.strerror or error}); make it readable (chmod u+rx)") from None


def query_items(paths) -> tuple[list[Path], list[str | None]]:
    """Query images from folders and files: (paths, true class or None per path).

    A folder of ``<class>/<image>`` gives labelled queries; a folder of images or a file gives unlabelled ones."""
    files, labels = [], []
    for entry in map(lambda p: Path(p).expanduser(), paths):
        if entry.is_dir():
            loose = list_images(entry)
            files += loose
            labels += [None] * len(loose)
            for name, images in class_folders(entry).items():
                files += images
                labels += [name] * len(images)
        elif entry.is_file():
            files.append(entry)
            labels.append(None)
        elif entry.exists():  # a pipe or device would block the reader
            raise DataError(f"query {entry} is not a regular file (a pipe, device or socket); give image files or "
                            f"folders")
        else:
            raise DataError(f"query {entry} does not exist; give image files or folders (<class>/<image> for "
                            f"accuracy)")
    return files, labels
