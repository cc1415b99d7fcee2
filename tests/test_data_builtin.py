"""Built-in domains: roles, shapes, class counts, disjoint classes, cache, CLI."""

import numpy as np
import pytest

from smat.data import BUILTIN_DOMAINS, ID_DOMAINS, OOD_DOMAINS, PRETRAIN_DOMAIN, BuiltinSource, make_sampler
from smat.data.__main__ import main
from smat.data.builtin import NATIVE_SIZE, cache_path
from smat.data.builtin.cache import cache_dir
from smat.data.builtin.glyphs import script_characters


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smat-cache")


@pytest.fixture(scope="module")
def source(cache):
    return BuiltinSource(cache=cache)


def test_roles(source):
    assert len(BUILTIN_DOMAINS) >= 8 and len(ID_DOMAINS) >= 4 and len(OOD_DOMAINS) >= 4
    assert "digits" in OOD_DOMAINS and not set(ID_DOMAINS) & set(OOD_DOMAINS)
    for name in ID_DOMAINS:
        domain = source[name]
        assert min(len(domain.classes(s)) for s in ("train", "val", "test")) >= 5
        assert sorted(sum(domain.splits.values(), [])) == list(range(len(domain.class_names)))
    for name in OOD_DOMAINS:
        assert source[name].classes("train") == [] and source[name].classes("val") == []
    assert len(source[PRETRAIN_DOMAIN].classes("train")) >= 64


@pytest.mark.parametrize("name,channels,classes,images", [
    ("digits", None, 10, 1797), ("shapes", 3, 44, 44 * 40), ("textures", 3, 28, 28 * 40),
    ("hebrew_arabic", None, None, None), ("pretrain", None, 640, 640 * 20),
])
def test_shapes_and_class_counts(source, name, channels, classes, images):
    domain = source[name]
    assert domain.images.dtype == np.uint8
    expected = (NATIVE_SIZE, NATIVE_SIZE) + ((channels,) if channels else ())
    assert domain.images.shape[1:] == expected
    if classes is not None:
        assert len(domain.class_names) == classes and len(domain.images) == images
    counts = [domain.num_items(c) for c in range(len(domain.class_names))]
    assert min(counts) >= 20 and sum(counts) == len(domain.images)
    assert domain.images.std() > 20  # not blank


def test_every_domain_can_make_episodes(source):
    for name in BUILTIN_DOMAINS:
        domain = source[name]
        split = next(s for s in ("test", "train") if domain.classes(s))
        spec = make_sampler(source, name, split, "variable").sample(np.random.default_rng(0))
        assert spec.n_way >= 5
        assert len(domain.class_names) >= 10


def test_glyph_classes_are_disjoint_and_not_blank():
    characters = script_characters()
    seen = [c for group in characters.values() for c in group]
    assert len(seen) == len(set(seen))
    assert "A" in characters["latin"] and "Α" not in characters["greek_cyrillic"]  # Greek Alpha = Latin A
    assert all(len(group) >= 20 for group in characters.values())


def test_glyph_instances_differ_within_a_class(source):
    first = source["latin"].images[:20].astype(int)
    assert len({image.tobytes() for image in first}) == 20
    assert source["latin"].class_names[0].startswith("U+0041")


def test_cache_location_and_reuse(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("SMAT_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SMAT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "smat"
    path = cache_path("digits", cache)
    stamp = path.stat().st_mtime_ns
    BuiltinSource("digits", cache=cache)
    assert path.stat().st_mtime_ns == stamp  # read from the cache, not rebuilt
    assert not list(path.parent.glob(".*tmp"))  # no temporary files left behind
    total = sum(f.stat().st_size for f in path.parent.iterdir())
    assert total < 40e6


def test_cli_show_writes_a_png(cache, monkeypatch, tmp_path, capsys):
    from PIL import Image

    monkeypatch.setenv("SMAT_CACHE_DIR", str(cache))
    out = tmp_path / "episode.png"
    assert main(["show", "shapes", "--way", "3", "--shot", "2", "--query", "1", "--size", "32",
                 "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.width > 3 * 32 and image.height > 3 * 32
    assert main(["show", "no_such_domain", "--out", str(out)]) == 2
    assert "no built-in domain" in capsys.readouterr().err
