"""``.ci/constraints.txt`` (the versions of the last green CI) pins every dependency that pyproject.toml names,
each at a version that pyproject.toml allows, so ``pip install -c .ci/constraints.txt ".[test]"`` reproduces
the tested environment instead of silently resolving a part of it anew."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            found[canonicalize_name(name)] = version
    return found


def test_every_dependency_is_pinned_at_a_version_pyproject_allows():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]
    pinned = pins()
    missing = [r.name for r in requirements if canonicalize_name(r.name) not in pinned]
    assert not missing, f"run .ci/run, then .ci/freeze: constraints.txt lacks {missing}"
    refused = [f"{r} (pinned {pinned[canonicalize_name(r.name)]})" for r in requirements
               if not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True)]
    assert not refused, f"constraints.txt pins versions that pyproject.toml refuses: {refused}"
    assert "smat" not in pinned
