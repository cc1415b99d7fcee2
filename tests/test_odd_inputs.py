"""Inputs that a hand sweep of the commands found mishandled (2026-12-07), each with what a user now gets.

- Images: 16-bit, 32-bit and float files decode at any size, scaled to 8 bits (they were dropped as
  "wrong mode" above 4× the decode size, and clipped to white below it); phone photos are turned upright by
  their EXIF orientation; macOS ``._x.jpg`` twins and formats Pillow cannot decode (.pdf, .h5) are not
  counted as images.
- Flags: a list option given twice adds to the list (``--folder A --folder B``); a one-value option given
  twice is an error naming both values, not a silent choice of the last.
- Outputs: no command opens or replaces a pipe or device; ``smat.predict`` leaves a user's
  ``<name>_confusion.png`` alone (``smat.analyze --output``'s guard: tests/test_analyze.py).
- A run trained on image folders loads (predict, export) when its data folder has moved, and its config
  names absolute paths; a folder that cannot be listed is one line.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inference import COLOURS, picture, write_run
from test_predict_cli import colour_folder

import smat
from smat import evaluate, predict
from smat.config import load_config, with_absolute_paths
from smat.data import DataError
from smat.data import __main__ as data_cli
from smat.data.builtin.cache import cache_dir, save_arrays
from smat.data.folder import ImageFolderSource, decode_image, image_extensions
from smat.data.samplers import make_sampler
from smat.evaluation.runs import load_run, read_run_config
from smat.inference import images as image_io
from smat.runtime import checkpoint
from smat.runtime.io import OutputError, atomic_write_text, check_output_folder

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "binary", binary=True)


def scan(size: int, dtype, top: float) -> np.ndarray:
    """A smooth mid-grey ramp from 20 % to 60 % of ``top``, as a 12/16-bit scan or a float image holds."""
    ramp = np.linspace(0.2, 0.6, size)[None, :].repeat(size, 0)
    return (ramp * top).astype(dtype)


@pytest.mark.parametrize("size", [48, 200], ids=["small", "over 4x the decode size"])
@pytest.mark.parametrize("mode, dtype, top", [("I;16", np.uint16, 65535), ("I", np.int32, 4095),
                                               ("F", np.float32, 1.0)])
def test_wide_images_decode_to_8_bits_with_their_contrast(tmp_path, size, mode, dtype, top):
    path = tmp_path / ("scan.png" if mode == "I;16" else "scan.tif")
    Image.fromarray(scan(size, dtype, top), mode if mode != "I;16" else None).save(path)
    assert Image.open(path).mode == mode
    pixels = decode_image(path, 16)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    left, right = pixels[:, : pixels.shape[1] // 4].mean(), pixels[:, -pixels.shape[1] // 4:].mean()
    assert 20 < left < right < 240, (left, right)  # neither clipped to white nor black, the ramp kept


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    image = Image.new("RGB", (60, 30), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 30))  # a blue band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90° clockwise to show it
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pixels = decode_image(tmp_path / "phone.jpg", 8)
    assert pixels.shape[:2] == (60, 30)  # portrait, as every viewer shows it
    assert pixels[:8, :, 2].mean() > 150 and pixels[-8:, :, 0].mean() > 150  # the left edge is now the top
    with Image.open(tmp_path / "phone.jpg") as opened:  # a PIL image given to smat.load(...).predict
        assert tuple(image_io.as_chw(opened, 8).shape) == (3, 60, 30)


def test_hidden_twins_and_undecodable_formats_are_not_images(tmp_path):
    extensions = image_extensions()
    assert {".jpg", ".png", ".webp", ".tif"} <= extensions and not {".pdf", ".h5", ".eps", ".mpg"} & extensions
    for name in ("red", "blue"):
        (tmp_path / "dom" / name).mkdir(parents=True)
        picture(COLOURS[name], 1).save(tmp_path / "dom" / name / "0.png")
        (tmp_path / "dom" / name / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / "dom" / name / "notes.pdf").write_bytes(b"%PDF-1.4")
    source = ImageFolderSource(tmp_path)
    domain = source["dom"]
    assert [domain.num_items(i) for i in range(len(domain.class_names))] == [1, 1]
    assert [path.name for path in image_io.list_images(tmp_path / "dom" / "red")] == ["0.png"]


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "query").mkdir()
    original = Path.iterdir

    def refuse(self):
        if self.name == "query":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError, match=r"cannot read .*query \(Permission denied\)"):
        image_io.query_items([tmp_path / "query"])


def test_list_options_given_twice_add_up_and_single_ones_are_an_error(capsys):
    args = evaluate.parse_args(["--checkpoint", "a", "--folder", "x", "--checkpoint", "b", "--folder", "y",
                                "--mode", "full", "adapt.steps=2", "--mode", "lora"])
    assert (args.checkpoint, args.folder, args.mode, args.overrides) == (["a", "b"], ["x", "y"], ["full", "lora"],
                                                                         ["adapt.steps=2"])
    assert evaluate.parse_args(["--checkpoint", "a"]).mode == ["protonet"]
    queries = predict.parse_args(["--checkpoint", "r", "--support", "s", "--query", "a", "--query", "b"]).query
    assert queries == ["a", "b"]
    for argv, flag in ((["--checkpoint", "r", "--support", "s", "--support", "t", "--query", "q"], "--support"),
                       (["--checkpoint", "r", "--checkpoint", "r2", "--support", "s", "--query", "q"], "--checkpoint")):
        with pytest.raises(SystemExit):
            predict.parse_args(argv)
        assert f"{flag} given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--checkpoint", "a", "--output", "o", "--output", "p"])
    assert "--output given twice ('o' and 'p')" in capsys.readouterr().err


def test_predict_keeps_a_users_confusion_png_and_replaces_its_own(run, tmp_path, capsys):
    support = colour_folder(tmp_path / "support", 2, 0)
    output = tmp_path / "mine.csv"
    argv = ["--checkpoint", str(run), "--support", str(support), "--query", str(support), "--output", str(output),
            "--device", "cpu"]
    users = tmp_path / "mine_confusion.png"
    picture(COLOURS["red"], 3).save(users)
    before = users.read_bytes()
    assert predict.main(argv) == 2
    assert "mine_confusion.png exists and is not a plot written by smat.predict" in capsys.readouterr().err
    assert users.read_bytes() == before and not output.exists()
    users.unlink()
    assert predict.main(argv) == 0 and users.is_file()
    assert predict.main(argv) == 0  # its own CSV and plot of the first call: replaced without --overwrite


@needs_fifo
def test_no_command_opens_or_replaces_a_pipe(run, tmp_path, capsys):
    support = colour_folder(tmp_path / "support", 2, 0)
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(code=predict.main(
        ["--checkpoint", str(run), "--support", str(support), "--query", str(support), "--output", str(pipe),
         "--device", "cpu", "--overwrite"])), daemon=True)
    worker.start()
    worker.join(120)
    assert outcome.get("code") == 2, "smat.predict blocked on a pipe given as --output"
    assert "pipe.csv is not a regular file" in capsys.readouterr().err
    assert pipe.exists() and not pipe.is_file()  # still the pipe
    with pytest.raises(OutputError, match="not a regular file"):
        atomic_write_text(pipe, "x")
    os.mkfifo(tmp_path / "query.png")
    with pytest.raises(DataError, match="query.png is not a regular file"):
        image_io.query_items([tmp_path / "query.png"])


def test_a_run_loads_when_its_data_folder_has_moved(tmp_path, capsys):
    data = tmp_path / "data"
    for c in range(20):  # 14/3/3 classes in the seeded 70/15/15 split: enough for the tiny run's 3-way tasks
        (data / "shades" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            picture((12 * c, 255 - 12 * c, 128), 10 * c + i, size=(20, 20)).save(data / "shades" / f"c{c}" / f"{i}.png")
    run = write_run(tmp_path / "run", binary=True, overrides=["data.source=folder", f"data.root={data}"])
    data.rename(tmp_path / "moved")
    assert read_run_config(run).data.root == str(data)
    load_run(run)  # predict and export need neither the data nor the folder it was in
    assert evaluate.main(["--checkpoint", str(run), "--episodes", "1", "--output", str(tmp_path / "ev")]) == 2
    assert f"image folder root {data} does not exist" in capsys.readouterr().err


def test_a_new_runs_config_names_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(load_config(None, ["data.root=data/mine", "data.test_folders=[extra]"]))
    assert config.data.root == str(tmp_path / "data" / "mine")
    assert config.data.test_folders == [str(tmp_path / "extra")] and config.model.weights is None


def test_a_file_or_step_folder_inside_a_run_names_the_run(run, capsys):
    for given in (run / "config.yaml", run / "checkpoints" / "step-0000000"):
        with pytest.raises(checkpoint.CheckpointError, match=f"such as {run}, which holds this path"):
            read_run_config(given)


def test_no_output_lands_in_a_runs_checkpoints_even_with_overwrite(run, tmp_path):
    with pytest.raises(OutputError, match="inside the checkpoints of the run"):
        check_output_folder(run / "checkpoints" / "step-0000000", overwrite=True)
    assert check_output_folder(run / "evaluation") == run / "evaluation"  # next to them is the default


def test_a_cache_folder_that_cannot_be_written_names_the_variable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SMAT_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(DataError, match=r"comes from \$SMAT_CACHE_DIR: set SMAT_CACHE_DIR to a writable folder"):
        save_arrays(cache_dir() / "x" / "y.npz", a=np.zeros(1))


def test_a_split_with_too_few_classes_says_so_not_add_images(tmp_path):
    for c in range(4):
        (tmp_path / "dom" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            picture((60 * c, 80, 80), i).save(tmp_path / "dom" / f"c{c}" / f"{i}.png")
    source = ImageFolderSource(tmp_path)  # 4 classes: the 70/15/15 split leaves 1 for val
    with pytest.raises(DataError, match="split 'val' holds 1 of the domain's 4 classes, but an episode needs 2"):
        make_sampler(source, "dom", "val", "fixed", n_way=2, k_shot=1, q_query=1)


def test_folders_of_formats_pillow_cannot_read_are_named(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    assert "1 .heic" in image_io.other_files([tmp_path / "q"]) and image_io.other_files([]) == ""


def test_smat_warnings_read_as_one_line_and_others_keep_their_format():
    ours = warnings.formatwarning("image x skipped", UserWarning, str(Path(smat.__file__)), 1)
    theirs = warnings.formatwarning("deprecated", UserWarning, "/elsewhere/lib.py", 3, "line")
    assert ours == "warning: image x skipped\n" and theirs.startswith("/elsewhere/lib.py:3: UserWarning")


def test_data_show_keeps_other_files_and_refuses_bad_sizes(tmp_path, capsys):
    root = tmp_path / "images"
    for c in range(10):  # 7 train classes in the seeded split
        (root / "shades" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            picture((25 * c, 80, 80), i, size=(20, 20)).save(root / "shades" / f"c{c}" / f"{i}.png")
    users = tmp_path / "mine.png"
    picture(COLOURS["red"], 1).save(users)
    before = users.read_bytes()
    show = ["show", "shades", "--folder", str(root), "--split", "train", "--way", "2", "--shot", "1", "--query",
            "1", "--size", "16"]
    assert data_cli.main([*show, "--out", str(users)]) == 2 and users.read_bytes() == before
    assert "is not a picture written by smat.data" in capsys.readouterr().err
    for _ in range(2):  # its own picture: replaced
        assert data_cli.main([*show, "--out", str(tmp_path / "episode.png")]) == 0
    with pytest.raises(SystemExit):
        data_cli.main([*show[:-2], "--size", "0"])
    assert "--size" in capsys.readouterr().err


def test_a_splits_file_finds_classes_whose_folders_are_decomposed_unicode(tmp_path):
    import json
    import unicodedata
    composed = ["café", "crème", "noël", "thé"]
    for c, name in enumerate(composed):  # macOS stores names decomposed: "e" + U+0301
        folder = tmp_path / unicodedata.normalize("NFD", "épicerie") / unicodedata.normalize("NFD", name)
        folder.mkdir(parents=True)
        for i in range(2):
            picture((60 * c, 80, 80), i).save(folder / f"{i}.png")
    splits = tmp_path.parent / f"{tmp_path.name}_splits.json"
    splits.write_text(json.dumps({"épicerie": {"train": composed[:2], "val": composed[2:3], "test": composed[3:]}},
                                 ensure_ascii=False))
    domain = ImageFolderSource(tmp_path, splits_file=splits, domains=["épicerie"])["épicerie"]
    assert [domain.class_names[i] for i in domain.splits["train"]] == composed[:2]
    assert [domain.class_names[i] for i in domain.splits["test"]] == ["thé"]
    assert domain.directory.name == unicodedata.normalize("NFD", "épicerie")  # the folder as it is on disk
