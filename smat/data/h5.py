"""Meta-Dataset converted to HDF5 (the layout of the PMF conversion), read lazily.

Layout::

    <root>/<source>/dataset_spec.json
    <root>/<source>/<class_id>.h5     one file per class; groups "0" … "N−1",
                                      each with "image" (uint8 H×W×3), "label", "id"

Class splits and image counts come from ``dataset_spec.json``: class ids are
numbered TRAIN first, then VALID, then TEST, as Meta-Dataset assigns them.

Community loaders open every class file up front and keep it open: thousands
of descriptors (``ulimit -n``) and HDF5 chunk caches that only grow. Here a
file is opened on first use inside the process that reads it, and at most
``max_open_files`` stay open per process (least recently used closed first).
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from .source import DataError, DataNotFoundError, Domain, Source, UnreadableImageError

LAYOUT = ("<root>/<source>/dataset_spec.json and <root>/<source>/<class_id>.h5 "
          "(Meta-Dataset converted to .h5 as in PMF)")
SPEC_SPLITS = {"TRAIN": "train", "VALID": "val", "TEST": "test"}


class H5FileCache:
    """At most ``max_open`` open read-only h5py files, least recently used closed first.

    Handles never cross a fork: a process that finds handles opened by its
    parent forgets them (without closing the parent's) and opens its own.
    """

    def __init__(self, max_open: int = 64):
        if max_open < 1:
            raise ValueError(f"max_open must be ≥ 1, got {max_open}")
        self.max_open = max_open
        self._files: OrderedDict[str, object] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str):
        if self._pid != os.getpid():
            self._files = OrderedDict()
            self._pid = os.getpid()
        handle = self._files.get(path)
        if handle is not None:
            self._files.move_to_end(path)
            return handle
        while len(self._files) >= self.max_open:
            _, oldest = self._files.popitem(last=False)
            oldest.close()
        try:
            handle = h5py.File(path, "r")
        except OSError as error:
            raise UnreadableImageError(f"cannot open {path} ({error}); the file is truncated or damaged: "
                                       f"convert this class to .h5 again") from None
        self._files[path] = handle
        return handle

    def __len__(self) -> int:
        return len(self._files) if self._pid == os.getpid() else 0

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._files.values():
                handle.close()
        self._files = OrderedDict()

    def __getstate__(self):
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])


class H5Domain(Domain):
    def __init__(self, name: str, directory: Path, class_names, images_per_class, splits, files: H5FileCache):
        super().__init__(name, class_names, splits)
        self.directory, self.images_per_class, self.files = directory, images_per_class, files

    def num_items(self, class_index: int) -> int:
        return self.images_per_class[class_index]

    def path(self, class_index: int) -> Path:
        return self.directory / f"{class_index}.h5"

    def describe(self, class_index: int, item: int) -> str:
        return f"{self.path(class_index)}[{item}]"

    def load(self, class_index: int, item: int) -> np.ndarray:
        path = self.path(class_index)
        if not path.is_file():
            raise DataNotFoundError(f"{path} is missing; expected {LAYOUT}")
        try:
            image = self.files.get(str(path))[str(item)]["image"][()]
        except (KeyError, OSError) as error:
            raise UnreadableImageError(f"{self.describe(class_index, item)} cannot be read ({error}); the file is "
                                       f"truncated or damaged: convert this class to .h5 again") from None
        if image.dtype == np.uint8 and image.ndim == 1:
            # Some conversions store the encoded file instead of decoded pixels.
            with Image.open(io.BytesIO(image.tobytes())) as decoded:
                return np.asarray(decoded.convert("RGB"))
        return np.asarray(image, dtype=np.uint8)


class MetaDatasetH5Source(Source):
    """Meta-Dataset sources under ``root`` (all sub-folders with a dataset_spec.json, or ``domains``).

    max_open_files: open .h5 files kept per process, shared by all domains.
    """

    def __init__(self, root, domains=None, max_open_files: int = 64):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"Meta-Dataset .h5 root {root} does not exist; expected {LAYOUT}")
        if domains is None:
            try:
                domains = sorted(d.name for d in root.iterdir() if (d / "dataset_spec.json").is_file())
            except OSError as error:
                raise DataError(f"cannot read the Meta-Dataset .h5 root {root} ({error.strerror or error}); "
                                f"make it readable (chmod u+rx)") from None
            if not domains:
                raise DataNotFoundError(f"no <source>/dataset_spec.json under {root}; expected {LAYOUT}")
        self.files = H5FileCache(max_open_files)
        super().__init__([self._domain(root / name) for name in domains])

    def _domain(self, directory: Path) -> H5Domain:
        spec_path = directory / "dataset_spec.json"
        if not spec_path.is_file():
            raise DataNotFoundError(f"{spec_path} does not exist; expected {LAYOUT}")
        spec = read_spec(spec_path)
        try:
            counts = split_counts(spec, spec_path)
            total = sum(counts.values())
            images = spec.get("images_per_class")
            if not isinstance(images, dict):
                raise DataError(f"{spec_path}: missing 'images_per_class' {{class_id: count}}")
            try:
                images_per_class = [int(images[str(c)]) for c in range(total)]
            except KeyError as error:
                raise DataError(f"{spec_path}: 'images_per_class' has no entry for class {error}") from None
            names = spec.get("class_names", {})
            class_names = [str(names.get(str(c), c)) for c in range(total)]
        except (AttributeError, TypeError, ValueError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"{spec_path} is not a valid Meta-Dataset dataset_spec.json ({error}); write it "
                            f"again with Meta-Dataset's conversion") from None
        missing = [str(directory / f"{c}.h5") for c in range(total) if not (directory / f"{c}.h5").is_file()]
        if missing:
            raise DataNotFoundError(f"{len(missing)} of the {total} class files that {spec_path} lists are missing: "
                                    f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}; convert those "
                                    f"classes to .h5 again; expected {LAYOUT}")
        splits, start = {}, 0
        for key in SPEC_SPLITS:
            splits[SPEC_SPLITS[key]] = list(range(start, start + counts[key]))
            start += counts[key]
        return H5Domain(directory.name, directory, class_names, images_per_class, splits, self.files)


def read_spec(spec_path: Path) -> dict:
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {spec_path} ({error}); it must be the JSON dataset_spec.json written by "
                        f"Meta-Dataset's conversion") from None
    if not isinstance(spec, dict):
        raise DataError(f"{spec_path} holds a JSON {type(spec).__name__}, not the object dataset_spec.json "
                        f"written by Meta-Dataset's conversion")
    return spec


def split_counts(spec: dict, spec_path) -> dict[str, int]:
    """Classes per split from a Meta-Dataset spec: plain, bi-level (Omniglot) or hierarchical (ImageNet)."""
    if "classes_per_split" in spec:
        raw = spec["classes_per_split"]
        return {key: int(raw.get(key, raw.get(f"Split.{key}", 0))) for key in SPEC_SPLITS}
    if "superclasses_per_split" in spec and "classes_per_superclass" in spec:
        per_super = [int(spec["classes_per_superclass"][str(i)])
                     for i in range(len(spec["classes_per_superclass"]))]
        counts, start = {}, 0
        for key in SPEC_SPLITS:
            raw = spec["superclasses_per_split"]
            n = int(raw.get(key, raw.get(f"Split.{key}", 0)))
            counts[key] = sum(per_super[start:start + n])
            start += n
        return counts
    if "split_subgraphs" in spec:
        graphs = spec["split_subgraphs"]
        return {key: sum(1 for node in graphs.get(key, graphs.get(f"Split.{key}", []))
                         if not node.get("children_ids")) for key in SPEC_SPLITS}
    raise DataError(f"{spec_path}: expected 'classes_per_split' (or 'superclasses_per_split' + "
                     f"'classes_per_superclass', or 'split_subgraphs') as written by Meta-Dataset")
