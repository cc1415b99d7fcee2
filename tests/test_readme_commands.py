"""Every ``python -m smat.…`` command line in README.md's code blocks parses with its CLI, so that the README
cannot rot: options and their order (overrides after list options, issue 16 item 6), config files that
exist, config keys and adaptation options that the config knows. ``torchrun …`` lines are checked for the
module's own arguments. The cheap part runs: each CLI's ``--help``, one of them as a real ``python -m``.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from smat.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
MODULE = re.compile(r"^smat(\.\w+)+$")
OPTIONAL = re.compile(r"^\[(-|[\w.]+=)")  # an optional option or override, not a list value


def readme_commands() -> list[tuple[str, list[str]]]:
    """(module, its arguments) of every smat command in README.md's code blocks, in order."""
    commands = []
    for block in FENCE.findall((ROOT / "README.md").read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            if "-m smat." not in line:
                continue
            for segment in re.split(r"&&|;|\|", line):
                words = shlex.split(segment, comments=True)
                if "-m" in words and MODULE.match(words[words.index("-m") + 1]):
                    start = words.index("-m")
                    commands.append((words[start + 1], without_optional_brackets(words[start + 2:])))
    return commands


def without_optional_brackets(words: list[str]) -> list[str]:
    """``[--output analysis]``, ``[adapt.steps=20]`` in a usage line: the optional part, taken as given."""
    result, inside = [], False
    for word in words:
        if OPTIONAL.match(word):
            inside, word = True, word[1:]
        if inside and word.endswith("]"):
            inside, word = False, word[:-1]
        result.append(word)
    return result


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_commands():
    modules = {module for module, _ in COMMANDS}
    assert {"smat.train", "smat.evaluate", "smat.analyze"} <= modules
    assert ("smat.evaluate", ["--checkpoint", "runs/builtin", "--mode", "full", "lora", "adapt.steps=20",
                              "adapt.lr_grid=[0,1e-4,1e-3]"]) in COMMANDS


@pytest.mark.parametrize("module, arguments", COMMANDS, ids=[" ".join([m, *a])[:90] for m, a in COMMANDS])
def test_readme_command_parses(module, arguments, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths (configs/…) are relative to the repository
    cli = importlib.import_module(module if module != "smat.data" else "smat.data.__main__")
    if not hasattr(cli, "parse_args"):  # smat.data: subcommands, checked through their --help
        with pytest.raises(SystemExit) as exit_:
            cli.main([arguments[0], "--help"])
        assert exit_.value.code == 0
        return
    args = cli.parse_args(arguments)
    if module == "smat.train":
        load_config(args.config, args.overrides)  # the files exist, the keys are known, the types fit
    elif module == "smat.evaluate":
        overrides, _ = cli.split_overrides(args.overrides)  # adapt.* options are known
        assert all("=" in text for text in overrides)
        assert set(args.mode) <= {"protonet", "select", "full", "lora"}


@pytest.mark.parametrize("module", sorted({module for module, _ in COMMANDS}))
def test_readme_module_help(module, capsys):
    cli = importlib.import_module(module if module != "smat.data" else "smat.data.__main__")
    with pytest.raises(SystemExit) as exit_:
        (cli.parse_args if hasattr(cli, "parse_args") else cli.main)(["--help"])
    assert exit_.value.code == 0
    assert "usage: python -m" in capsys.readouterr().out


def test_python_m_smat_train_help_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "smat.train", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0 and "--resume" in result.stdout, result.stderr
