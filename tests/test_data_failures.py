"""Every data failure a user can cause ends in one typed error that names the
problem and the fix (``DataError``; the CLIs print it as one ``error:`` line),
or, for unusable images and classes, in a warning, a skip and a count; and
big images are decoded in bounded memory."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
from test_data_sources import write_folder, write_h5_source

from smat.data import (
    DataError,
    DataNotFoundError,
    EpisodeDataset,
    EpisodeLoader,
    EvalTransform,
    ImageFolderSource,
    MetaDatasetH5Source,
)
from smat.data.folder import MAX_PIXELS
from smat.data.samplers import FixedSampler


def forge_png_size(path, width: int, height: int) -> None:
    """Rewrite a PNG's header to claim width×height: opening it reads the
    header only, so this tests the size checks without a huge file."""
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))


def folder_loader(root, n_way=5, **source_options) -> EpisodeLoader:
    source = ImageFolderSource(root, fractions=(1.0, 0.0, 0.0), size_hint=16, **source_options)
    dataset = EpisodeDataset(source, FixedSampler(source["birds"], "train", n_way, 1, 1), EvalTransform(8),
                             num_episodes=6)
    return EpisodeLoader(dataset)


@pytest.mark.parametrize(("width", "height", "words"), [
    (20000, 20000, "over Pillow's decompression-bomb limit"),   # Pillow refuses it when opening
    (12000, 12000, f"144000000 pixels is over the limit of {MAX_PIXELS}"),  # under Pillow's, over smat's
])
def test_image_over_the_pixel_limit_is_skipped_and_counted(tmp_path, width, height, words):
    write_folder(tmp_path, "birds", classes=5, per_class=4)
    huge = tmp_path / "birds" / "class2" / "1.png"
    forge_png_size(huge, width, height)
    loader = folder_loader(tmp_path)
    with pytest.warns(UserWarning, match=words):
        tasks = list(loader)
    assert len(tasks) == 6
    assert set(loader.skipped) == {str(huge)} and "1 unreadable images skipped" in loader.summary()


def test_the_pixel_limit_can_be_lowered(tmp_path):
    write_folder(tmp_path, "birds", classes=5, per_class=4, size=20)
    loader = folder_loader(tmp_path, max_pixels=100)  # every 20×24 image is over it
    with pytest.warns(UserWarning), pytest.raises(DataError, match="only 4 classes have enough readable images"):
        list(loader)


def test_class_with_only_unreadable_images_is_excluded_with_a_warning(tmp_path):
    write_folder(tmp_path, "birds", classes=6, per_class=3)
    for image in (tmp_path / "birds" / "class4").iterdir():
        image.write_bytes(b"damaged")
    loader = folder_loader(tmp_path)
    with pytest.warns(UserWarning, match="excluding class 'class4' of domain 'birds'"):
        tasks = list(loader)
    assert len(tasks) == 6
    assert all("class4" not in task.class_names and task.n_way == 5 for task in tasks)
    assert sum("class4" in name for name in loader.skipped) == 3
    # The redraw depends on the seed, the index and the data only: a second pass gives the same tasks.
    again = list(folder_loader(tmp_path))
    assert [t.class_names for t in again] == [t.class_names for t in tasks]


def test_unreadable_class_folder(tmp_path, monkeypatch):
    write_folder(tmp_path, "birds", classes=5, per_class=2)
    locked = tmp_path / "birds" / "class3"
    listing = pathlib.Path.iterdir

    def iterdir(self):
        # chmod 000 does not stop root (the CI user here): the refusal is simulated where the OS would give it.
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=r"cannot read the class folder .*class3 \(Permission denied\).*chmod u\+rx"):
        ImageFolderSource(tmp_path)


def test_invalid_splits_file(tmp_path):
    write_folder(tmp_path, "birds", classes=5, per_class=2)
    splits = tmp_path / "splits.json"
    for content, words in (("{not json", "cannot read the splits file"), ("[1, 2]", "must map each domain"),
                           ('{"birds": {"train": "class0"}}', "must be a list of class names")):
        splits.write_text(content)
        with pytest.raises(DataError, match=words):
            ImageFolderSource(tmp_path, splits_file=splits)


@pytest.fixture
def h5_domain(tmp_path):
    return write_h5_source(tmp_path, "aircraft", [4] * 8, classes_per_split=(6, 1, 1))


def test_missing_h5_class_file(tmp_path, h5_domain):
    (h5_domain / "3.h5").unlink()
    with pytest.raises(DataNotFoundError, match=r"1 of the 8 class files .* are missing: .*3\.h5.*convert"):
        MetaDatasetH5Source(tmp_path)


def test_truncated_h5_class_file_excludes_its_class_with_a_warning(tmp_path, h5_domain):
    damaged = h5_domain / "2.h5"
    damaged.write_bytes(damaged.read_bytes()[:200])
    source = MetaDatasetH5Source(tmp_path)
    dataset = EpisodeDataset(source, FixedSampler(source["aircraft"], "train", 5, 1, 1), EvalTransform(8),
                             num_episodes=8)
    with pytest.warns(UserWarning, match=r"2\.h5 .*truncated or damaged: convert this class to \.h5 again"):
        tasks = list(EpisodeLoader(dataset))
    assert all("n0002" not in task.class_names for task in tasks)


@pytest.mark.parametrize(("content", "words"), [
    ("{broken", "cannot read .*dataset_spec.json"),
    ("[]", "holds a JSON list, not the object dataset_spec.json"),
    (json.dumps({"classes_per_split": {"TRAIN": "six"}}), "not a valid Meta-Dataset dataset_spec.json"),
    (json.dumps({"classes_per_split": {"TRAIN": 6, "VALID": 1, "TEST": 1}}), "missing 'images_per_class'"),
    (json.dumps({"name": "aircraft"}), "expected 'classes_per_split'"),
])
def test_invalid_dataset_spec(tmp_path, h5_domain, content, words):
    (h5_domain / "dataset_spec.json").write_text(content)
    with pytest.raises(DataError, match=words):
        MetaDatasetH5Source(tmp_path, domains=["aircraft"])


def test_missing_dataset_spec(tmp_path, h5_domain):
    (h5_domain / "dataset_spec.json").unlink()
    with pytest.raises(DataNotFoundError, match="aircraft/dataset_spec.json does not exist"):
        MetaDatasetH5Source(tmp_path, domains=["aircraft"])


# --------------------------------------------------------------------------
# Bounded memory
# --------------------------------------------------------------------------

PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import numpy as np
    from smat.data import EvalTransform
    from smat.data.folder import decode_image
    from PIL import Image

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    path = Path(sys.argv[1])
    before = peak_mib()
    if sys.argv[2] == "full":  # what smat did before: decode at full size, then shrink in the transform
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    else:
        pixels = decode_image(path, size=32)
    batch = EvalTransform(32)([pixels])
    assert batch.shape == (1, 3, 32, 32)
    print(f"{peak_mib() - before:.0f}")
""")


def peak_rss_mib(path, mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), mode], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip())


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    """A 10000² RGB PNG, written in a subprocess so that pytest never holds it."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    script = ("import sys; from PIL import Image; "
              "Image.linear_gradient('L').resize((10000, 10000)).convert('RGB').save(sys.argv[1], compress_level=1)")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=600)
    return path


def test_big_png_is_decoded_in_bounded_memory(big_png):
    """Peak RSS of one 10000² PNG through decode and transform: Pillow's one
    decoded copy (4 bytes a pixel, 381 MiB) plus small change, where decoding
    at full size and shrinking in the transform took several GiB."""
    peak = peak_rss_mib(big_png, "decode")
    assert peak < 600, f"decoding a 10000² PNG raised peak RSS by {peak:.0f} MiB"
