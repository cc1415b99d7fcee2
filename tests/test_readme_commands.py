"""Every ``python -m smat.…`` command line in the code blocks of README.md and docs/*.md parses with its CLI,
so that the documentation cannot rot: options and their order (overrides after list options, issue 16 item 6),
config files that exist, config keys and adaptation options that the config knows. ``torchrun …`` lines are
checked for the module's own arguments. The cheap part runs: each CLI's ``--help``, one of them as a real
``python -m``. Also: the README stays a front page (at most 300 lines), every relative link of these pages
points at a file and a heading that exist, and no committed result file holds an absolute path of a home,
temporary or work folder.
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


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300


def page_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(module, its arguments) of every smat command in the code blocks of one page, in order."""
    commands = []
    for block in FENCE.findall(page.read_text()):
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


README_COMMANDS = page_commands(ROOT / "README.md")
COMMANDS = [(page.relative_to(ROOT).as_posix(), module, arguments)
            for page in PAGES for module, arguments in page_commands(page)]


def test_the_readme_shows_the_main_commands():
    assert ("smat.train", []) in README_COMMANDS  # install + the main job
    assert {"smat.evaluate", "smat.predict", "smat.reproduce"} <= {module for module, _ in README_COMMANDS}


def test_the_docs_show_every_cli():
    documented = {module for _, module, _ in COMMANDS}
    assert {"smat.train", "smat.evaluate", "smat.analyze", "smat.predict", "smat.export", "smat.study", "smat.far_ood",
            "smat.reproduce", "smat.data"} <= documented
    assert ("smat.evaluate", ["--checkpoint", "runs/builtin", "--mode", "full", "lora", "adapt.steps=20",
                              "adapt.lr_grid=[0,1e-4,1e-3]"]) in [(m, a) for _, m, a in COMMANDS]


def test_the_readme_has_the_install_and_test_commands_of_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    for command in ('pip install ".[test]"', "pytest tests -q -p no:cacheprovider"):
        assert command in ci, f".ci/run no longer runs {command!r}: update the README and this test"
        assert f"\n{command}\n" in readme, f"the README must show CI's command {command!r} on a line of its own"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(heading) for heading in HEADING.findall(text)}


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {path}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {path or page.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


ABSOLUTE = re.compile(r"(?<![\w.~])/(?:home|Users|root|tmp|work|var/folders|private/var)/[^\s\"']*")
RESULT_FOLDERS = [ROOT / "docs" / "results", ROOT / "benchmarks" / "results"]


def test_no_result_file_holds_an_absolute_path_of_a_machine():
    found = []
    for folder in RESULT_FOLDERS:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in {".md", ".json", ".csv", ".txt"}:
                found += [f"{path.relative_to(ROOT)}: {hit}" for hit in ABSOLUTE.findall(path.read_text())]
    assert not found, "absolute paths of a machine in committed results: " + "; ".join(found)


@pytest.mark.parametrize("page, module, arguments", COMMANDS,
                         ids=[" ".join([p.removeprefix("docs/"), m, *a])[:100] for p, m, a in COMMANDS])
def test_documented_command_parses(page, module, arguments, monkeypatch):
    monkeypatch.chdir(ROOT)  # the pages' paths (configs/…) are relative to the repository
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


@pytest.mark.parametrize("module", sorted({module for _, module, _ in COMMANDS}))
def test_documented_module_help(module, capsys):
    cli = importlib.import_module(module if module != "smat.data" else "smat.data.__main__")
    with pytest.raises(SystemExit) as exit_:
        (cli.parse_args if hasattr(cli, "parse_args") else cli.main)(["--help"])
    assert exit_.value.code == 0
    assert "usage: python -m" in capsys.readouterr().out


def test_python_m_smat_train_help_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "smat.train", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0 and "--resume" in result.stdout, result.stderr


def test_the_readmes_kernel_example_runs(capsys):
    """The README's "kernel library in ten lines" runs as printed."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    example = next(block for block in blocks if "smat_kernels" in block)
    exec(compile(example, "README.md", "exec"), {})
    assert "reference" in capsys.readouterr().out  # it printed sk.backends()
