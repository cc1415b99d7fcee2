"""The installed package is complete (issue 22, item 11): the configs are package data and resolve by name
from any folder; the README's commands that need no data (``--help``, ``--dry-run``) run from a folder outside
the checkout; every CLI's flags are checked as they are parsed (item 9)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_config_fuzz import LINE_LIMIT, run_batch

from smat.config import PACKAGE_CONFIGS, ConfigError, bundled_configs, find_config, load_config

ROOT = Path(__file__).resolve().parent.parent
CLIS = ("smat.train", "smat.evaluate", "smat.predict", "smat.export", "smat.analyze", "smat.study",
        "smat.far_ood", "smat.reproduce")


# ---------------------------------------------------------------- configs as package data

def test_the_configs_live_once_in_the_package():
    assert not (ROOT / "configs").exists(), "configs/ was moved to smat/configs (one source of truth)"
    source = ROOT / "smat" / "configs"
    files = sorted(path.relative_to(source) for path in source.rglob("*.yaml"))
    assert len(files) >= 12 and not any((source / path).is_symlink() for path in files)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["smat"]
    shipped = {path.relative_to(source) for pattern in patterns for path in (ROOT / "smat").glob(pattern)
               if path.is_relative_to(source)}
    assert set(files) <= shipped, f"not package data: {sorted(set(files) - shipped)}"
    # the package that runs (installed, or this checkout when editable) holds every one of them
    installed = {path.relative_to(PACKAGE_CONFIGS) for path in PACKAGE_CONFIGS.rglob("*.yaml")}
    assert set(files) <= installed, f"missing from {PACKAGE_CONFIGS}: {sorted(set(files) - installed)}"


@pytest.mark.parametrize("name", ["pmf", "baselines/pmf", "baselines/pmf.yaml", "configs/baselines/pmf.yaml"])
def test_a_bundled_config_resolves_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(name) == PACKAGE_CONFIGS / "baselines" / "pmf.yaml"
    config = load_config([name])
    assert config.method == "pmf" and config.config_files == [str(PACKAGE_CONFIGS / "baselines" / "pmf.yaml")]


def test_a_file_here_comes_before_a_bundled_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "pmf.yaml").write_text("method: softmerge\n")
    assert load_config(["baselines/pmf.yaml"]).method == "softmerge"
    (tmp_path / "mine.yaml").write_text("base: pmf\nseed: 3\n")  # base: names a bundled config from a user's file
    config = load_config(["mine.yaml"])
    assert config.method == "pmf" and config.seed == 3


def test_an_unknown_config_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config(["pfm"])
    assert "baselines/pmf" in str(error.value) and "baselines/pmf" in bundled_configs()


# ---------------------------------------------------------------- the README's commands outside the checkout

DRY = re.compile(r"--dry-run|--help")


def readme_commands_without_data() -> list[tuple[str, list[str]]]:
    """(module, arguments) of the README's smat commands that need no data: --help, and --dry-run without
    --measure-steps (measuring needs the data)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            needs_none = DRY.search(line) and "--measure-steps" not in line
            words = shlex.split(line, comments=True) if "-m smat." in line and needs_none else []
            if "-m" in words and words[words.index("-m") + 1] in CLIS:
                start = words.index("-m")
                commands.append((words[start + 1], words[start + 2:]))
    return commands


COMMANDS = [*readme_commands_without_data(), *[(cli, ["--help"]) for cli in CLIS],
            ("smat.reproduce", ["table1", "--dry-run"]),
            ("smat.reproduce", ["table2", "--dry-run", "--preset", "authors_code", "--step-seconds", "2"]),
            ("smat.reproduce", ["fig3", "--backbone", "vit_base", "--dry-run", "--step-seconds", "1.5"]),
            ("smat.study", ["--dry-run"]), ("smat.study", ["--dry-run", "--quick", "train.epochs=1"])]


def test_commands_that_need_no_data_run_from_a_folder_outside_the_checkout(tmp_path):
    """Each in an empty folder (cwd): exit 0, what it promises printed, nothing written there."""
    cases = []
    for index, (module, arguments) in enumerate(COMMANDS):
        folder = tmp_path / f"cwd{index}"
        folder.mkdir()
        cases.append({"name": " ".join([module, *arguments]), "module": module, "argv": arguments,
                      "cwd": str(folder), "inputs": [], "seconds": 120})
    results = run_batch(cases, tmp_path)
    for case, result in zip(cases, results):
        assert result["code"] in (0, None) and not result["crash"], (case["name"], result)
        assert not list(Path(case["cwd"]).iterdir()), f"{case['name']} wrote into {case['cwd']}"
        output = result["stdout"]
        if "--help" in case["argv"]:
            assert "usage: python -m " + case["module"] in output, case["name"]
        elif case["module"] == "smat.reproduce":
            assert "GPU-hours" in output and "python -m smat.train --config " in output, (case["name"], output)
        else:
            assert "hours of meta-training" in output and "- pretrained:" in output, (case["name"], output)


def test_python_m_reproduce_dry_run_outside_the_checkout(tmp_path):
    finished = subprocess.run([sys.executable, "-m", "smat.reproduce", "table1", "--dry-run"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "- pretrained: 0 steps" in finished.stdout
    for name in ("pmf", "softmerge", "smat"):
        assert f"- {name}: 12500 steps" in finished.stdout
    assert "GPU-hours" in finished.stdout and "assumed, not measured" in finished.stdout
    assert str(PACKAGE_CONFIGS / "vit_small_dino_metadataset.yaml") in finished.stdout
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- item 9: every CLI's flags


BAD_FLAGS = [
    ("smat.predict", ["--device", "bogus"], "argument --device: 'bogus' is not a device"),
    ("smat.predict", ["--device", "cuda:x"], "argument --device"),
    ("smat.predict", ["--lr", "nan"], "argument --lr: must be a positive finite number; got 'nan'"),
    ("smat.predict", ["--lr", "-1"], "argument --lr: must be a positive finite number; got '-1'"),
    ("smat.predict", ["--lr", "inf"], "argument --lr"),
    ("smat.predict", ["--lr", "x"], "argument --lr"),
    ("smat.predict", ["--mode", "bogus"], "argument --mode"),
    ("smat.evaluate", ["--episodes", "0"], "argument --episodes: must be an integer from 1"),
    ("smat.evaluate", ["--episodes", "1e99"], "argument --episodes: must be an integer"),
    ("smat.evaluate", ["--episodes", str(2**40)], "argument --episodes: must be an integer from 1 to 2147483647"),
    ("smat.analyze", ["--device", "tpu"], "argument --device"),
    ("smat.analyze", ["--episodes", "-3"], "argument --episodes"),
    ("smat.study", ["--device", "bogus"], "argument --device"),
    ("smat.study", ["--episodes", "1"], "argument --episodes: must be an integer from 2"),
    ("smat.study", ["--step-seconds", "-1"], "argument --step-seconds"),
    ("smat.far_ood", ["--device", "bogus"], "argument --device"),
    ("smat.far_ood", ["--episodes", "1"], "argument --episodes: must be an integer from 2"),
    ("smat.reproduce", ["table1", "--dry-run", "--step-seconds", "nan"], "argument --step-seconds"),
    ("smat.reproduce", ["table1", "--dry-run", "--measure-steps", "0"], "argument --measure-steps"),
    ("smat.reproduce", ["table1", "--device", "bogus", "--dry-run"], "argument --device"),
    ("smat.reproduce", ["table1", "--episodes", "1", "--dry-run"], "argument --episodes"),
    ("smat.reproduce", ["table1"], "--data-root is required"),
    ("smat.reproduce", ["table1", "--dry-run", "--measure-steps", "2"], "--data-root is required"),
    ("smat.reproduce", ["table9", "--dry-run"], "argument table"),
    ("smat.export", ["run"], "the following arguments are required: --output"),
]


def base_arguments(module: str) -> list[str]:
    """What the CLI needs besides the flag under test, so that only that flag can be wrong."""
    return {"smat.predict": ["--checkpoint", "r", "--support", "s", "--query", "q"],
            "smat.evaluate": ["--checkpoint", "r"], "smat.analyze": ["r"]}.get(module, [])


@pytest.mark.parametrize("module, flags, words", BAD_FLAGS, ids=[" ".join([m, *f]) for m, f, _ in BAD_FLAGS])
def test_a_bad_flag_is_a_usage_error(module, flags, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base_arguments(module), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and "Traceback" not in err, err
    assert all(len(line) <= LINE_LIMIT for line in err.splitlines())
    assert not list(tmp_path.iterdir())


def test_device_cuda_without_a_gpu_is_a_usage_error(capsys, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    monkeypatch.chdir(tmp_path)
    for module in ("smat.predict", "smat.analyze", "smat.study"):
        cli = importlib.import_module(module)
        with pytest.raises(SystemExit) as exit_:
            cli.main([*base_arguments(module), "--device", "cuda"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "no CUDA GPU is visible here" in err, err
