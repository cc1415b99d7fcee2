"""Built-in domains: roles, shapes, class counts, disjoint classes, cache, CLI."""

import numpy as np
import pytest

from smat.data import BUILTIN_DOMAINS, ID_DOMAINS, OOD_DOMAINS, PRETRAIN_DOMAIN, BuiltinSource, make_sampler
from smat.data.__main__ import main
from smat.data.builtin import NATIVE_SIZE, cache_path
from smat.data.builtin.cache import cache_dir
from smat.data.builtin.glyphs import PRETRAIN, script_characters, shape_or_digit
from smat.data.builtin.pretrain_families import (
    BANDPASS_CENTRES,
    KINDS,
    MAX_SHAPE_IOU,
    WAVE_FREQUENCIES,
    blob_classes,
    iou,
    polygon_mask,
)
from smat.data.builtin.shapes import FAMILIES, FREQUENCIES, TEXTURES


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
    ("hebrew_arabic", None, None, None), ("pretrain", 3, 240 + 160, (240 + 160) * 40),
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


def test_no_test_class_in_pretraining_by_identity(source):
    """Pre-training shares no class with any ID or OOD domain: not a character, not a digit, not a shape or
    texture family, not a generator setting, and no procedural outline that looks like a test shape."""
    characters = script_characters()
    pretrain = set(characters[PRETRAIN])
    for domain, group in characters.items():
        if domain != PRETRAIN:
            assert not pretrain & set(group), domain
    assert not [c for c in pretrain if shape_or_digit(c)]  # no ➊ (digit one), no ▲ (triangle), no ➔ (arrow)
    assert shape_or_digit("▲") and shape_or_digit("➊") and shape_or_digit("★") and not shape_or_digit("ᐁ")
    names = source[PRETRAIN_DOMAIN].class_names
    glyph_names = {n for n in names if n.startswith("U+")}
    assert {chr(int(n.split()[0][2:], 16)) for n in glyph_names} <= pretrain
    for name in (*ID_DOMAINS, *OOD_DOMAINS):
        assert not set(names) & set(source[name].class_names), name
    procedural_kinds = {n.split()[0] for n in names if not n.startswith("U+")}
    assert procedural_kinds == set(KINDS)
    test_families = set(FAMILIES) | set(TEXTURES)
    assert not procedural_kinds & test_families
    assert not {k.rstrip("s") for k in procedural_kinds} & {f.rstrip("s") for f in test_families}
    assert not set(WAVE_FREQUENCIES + BANDPASS_CENTRES) & set(FREQUENCIES.values())
    # the outlines: none overlaps a test shape family at any rotation (checked every 5°, generated every 10°)
    outlines = blob_classes(12, np.random.default_rng(0))
    for outline in outlines:
        mask = polygon_mask([(outline, 1)])
        for parts in FAMILIES.values():
            worst = max(iou(mask, polygon_mask(parts, np.deg2rad(d))) for d in range(0, 360, 5))
            assert worst < MAX_SHAPE_IOU + 0.05


def test_meta_training_never_sees_a_test_class(source):
    """ID domains: train, val and test splits hold different characters / shape families; OOD domains and the
    pre-training domain hold none of the ID test classes."""
    for name in ID_DOMAINS:
        domain = source[name]
        by_split = {split: {domain.class_names[c] for c in domain.classes(split)} for split in ("train", "val", "test")}
        assert not by_split["train"] & by_split["test"] and not by_split["val"] & by_split["test"]
        assert not by_split["train"] & by_split["val"]
        families = {split: {n.split(" (")[0] for n in names} for split, names in by_split.items()}
        if name == "shapes":  # a family's filled and outline classes may sit in different splits: report it
            assert families["train"] | families["test"] <= set(FAMILIES)
