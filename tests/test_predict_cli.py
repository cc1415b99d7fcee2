"""``python -m smat.predict``, ``python -m smat.export`` and ``python -m smat.evaluate --folder`` end to end on
generated image folders (with a damaged image and an empty class), over the tiny runs of test_inference."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_inference import COLOURS, picture, write_run

from smat import evaluate, export, predict


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "binary", binary=True)


def colour_folder(root: Path, images: int, seed: int) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(images):
            picture(colour, seed + 10 * c + i, size=(36 + i, 30)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    support = colour_folder(root / "support", 3, 0)
    (support / "red" / "damaged.jpg").write_bytes(b"\xff\xd8\xff not really")
    query = colour_folder(root / "query", 2, 500)
    (query / "green" / "damaged.png").write_bytes(b"\x89PNG broken")
    (query / "empty_class").mkdir()
    return support, query


def test_predict_end_to_end(run, folders, tmp_path):
    support, query = folders
    output = tmp_path / "out" / "predictions.csv"
    result = subprocess.run([sys.executable, "-m", "smat.predict", "--checkpoint", str(run), "--support", str(support),
                             "--query", str(query), "--output", str(output), "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 6 and {row["true"] for row in rows} == set(COLOURS)
    assert all(row["predicted"] in COLOURS and 0 < float(row["probability"]) <= 1 for row in rows)
    assert "1 query image(s) could not be read" in result.stdout and "damaged.png" in result.stdout
    assert "accuracy" in result.stdout and (tmp_path / "out" / "predictions_confusion.png").stat().st_size > 0
    assert "damaged.jpg" in result.stderr  # the damaged support image: skipped with a warning


def test_predict_refuses_an_empty_support_class_and_a_single_class(run, folders, tmp_path, capsys):
    support, query = folders
    (tmp_path / "support" / "red").mkdir(parents=True)
    picture(COLOURS["red"], 1).save(tmp_path / "support" / "red" / "0.png")
    (tmp_path / "support" / "blue").mkdir()
    arguments = ["--checkpoint", str(run), "--query", str(query), "--output", str(tmp_path / "p.csv")]
    assert predict.main(arguments + ["--support", str(tmp_path / "support")]) == 2
    assert "'blue'" in capsys.readouterr().err
    (tmp_path / "support" / "blue").rmdir()
    assert predict.main(arguments + ["--support", str(tmp_path / "support")]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_export_cli_and_predictions_from_the_export_are_identical(run, folders, tmp_path, capsys):
    support, query = folders
    assert export.main([str(run), "--output", str(tmp_path / "export")]) == 0
    assert "bit for bit" in capsys.readouterr().out
    for name, checkpoint in (("run.csv", run), ("export.csv", tmp_path / "export")):
        assert predict.main(["--checkpoint", str(checkpoint), "--support", str(support), "--query", str(query),
                             "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "run.csv").read_text() == (tmp_path / "export.csv").read_text()


def test_evaluate_adds_a_folder_as_an_ood_domain(run, tmp_path):
    mine = colour_folder(tmp_path / "mine", 5, 0)  # <class>/<image>: one domain, named after the folder
    assert evaluate.main(["--checkpoint", str(run), "--datasets", "latin", "--folder", str(mine),
                          "--episodes", "2", "--output", str(tmp_path / "evaluation")]) == 0
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())["results"]
    assert {(r["domain"], r["role"]) for r in results} == {("latin", "id"), ("mine", "ood")}
    assert "| mine | OOD |" in (tmp_path / "evaluation" / "results.md").read_text()
