"""Test folders must never shadow an installed package.

pytest's default import mode puts ``tests/`` on ``sys.path``, so a test package named like a package on PyPI (a
``tests/kernels/``, say) would be what ``import kernels`` finds for every library imported during the tests:
transformers checks for and imports the ``kernels`` package, and peft imports transformers, so a folder of ours
named ``kernels`` broke every LoRA test once."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def _top_level_names() -> set[str]:
    """Names that ``tests/`` on sys.path makes importable: packages (folders with __init__.py) and modules."""
    names = {path.name for path in TESTS.iterdir() if (path / "__init__.py").is_file()}
    names |= {path.stem for path in TESTS.glob("*.py")}
    return names


def test_no_test_folder_is_named_like_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = sorted(name for name in _top_level_names() if name in installed and name != "conftest")
    assert not clashes, f"tests/ makes {clashes} importable, which installed distributions also provide: rename them"


def test_kernels_imports_as_transformers_does():
    """transformers' hub_kernels: ``importlib.util.find_spec("kernels")`` then ``import kernels``."""
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return  # not installed: then nothing of ours may answer to the name either (the test above)
    assert spec.origin is None or not pathlib.Path(spec.origin).resolve().is_relative_to(TESTS), spec.origin
    kernels = importlib.import_module("kernels")
    location = getattr(kernels, "__file__", None) or ""
    assert not location or not pathlib.Path(location).resolve().is_relative_to(TESTS), location
