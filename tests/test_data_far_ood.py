"""Far-OOD built-in domains and the three groups: sources, disjointness from training, determinism, reports."""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import socket
import unicodedata
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import sklearn
from fontTools.ttLib import TTFont
from PIL import ImageFilter, ImageFont

from smat.data import FAR_OOD_DOMAINS, ID_DOMAINS, NEAR_OOD_DOMAINS, OOD_DOMAINS, PRETRAIN_DOMAIN, BuiltinSource
from smat.data import builtin as builtin_module
from smat.data.builtin import DOMAINS, FAR_OOD_TAG, GROUPS, NATIVE_SIZE, cache_path, domain_seed, far_ood, glyphs
from smat.data.groups import average_keys, in_group, label
from smat.evaluation.report import markdown_table, summarise
from smat.evaluation.tables import ModeResult, results_csv, results_markdown
from smat.experiments import RunResult, RunSpec
from smat.experiments.claims import judge_claims, paired_difference

NEW_FAR_OOD = ("photo_patches", "scan_patches", "cm_outline", "lowres_inverted")
# sha256 of the images of each far-OOD domain as generated at NATIVE_SIZE with its domain seed: the built-in
# data must be the same bytes on every machine (a change here is a change of the data: bump FAR_OOD_TAG)
RECORDED = {
    "digits": "3e5d1fe8ab576bf47b06861e297adbac35bf95739a686e2f66be684f114e4584",
    "photo_patches": "e5a9d5e725b1303b5145f591c1410e345b826b207d8f9e2d9ce1745ad45ee98d",
    "scan_patches": "390803d4b256db608bb242e431d76e1e93db68649c5dd6b814b91a1aa7ecac67",
    "cm_outline": "9ac4ff43c0dd26cf492d2129646665d5118d0df2d459e7f051af8ab452f94748",
    "lowres_inverted": "c2368ddabe81d8cea7e22fca54a7c012df41c169d463871958339b399be55302",
}


def images_hash(name: str) -> str:
    images, labels, names = DOMAINS[name].generate(NATIVE_SIZE, domain_seed(name))
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    digest.update("\n".join(names).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- groups are part of the definition

def test_every_domain_has_a_group():
    assert set(GROUPS) == {"id", "near_ood", "far_ood"}
    for name, domain in DOMAINS.items():
        assert domain.group in (*GROUPS, "far_ood_val", "pretrain"), name
        assert domain.role == {"id": "id", "near_ood": "ood", "far_ood": "ood", "far_ood_val": "ood",
                               "pretrain": "pretrain"}[domain.group]
    assert DOMAINS[PRETRAIN_DOMAIN].group == "pretrain"
    assert NEAR_OOD_DOMAINS == ("armenian_georgian", "hebrew_arabic", "braille", "textures")
    assert len(FAR_OOD_DOMAINS) >= 4 and "digits" in FAR_OOD_DOMAINS and set(NEW_FAR_OOD) <= set(FAR_OOD_DOMAINS)
    assert OOD_DOMAINS == NEAR_OOD_DOMAINS + FAR_OOD_DOMAINS and not set(ID_DOMAINS) & set(OOD_DOMAINS)


def test_existing_cache_files_keep_their_names():
    """ID, near-OOD, digits and pre-training keep builtin-v3's file names: a cache written before the far-OOD
    domains stays valid; the new domains carry their own tag."""
    for name in DOMAINS:
        tag = f"-{FAR_OOD_TAG}" if name in (*NEW_FAR_OOD, "relief_patches") else ""
        assert cache_path(name, Path("/c")) == Path(f"/c/builtin-v3/{name}{tag}-{NATIVE_SIZE}px.npz")


# ---------------------------------------------------------------- sources: pip dependencies only

def _imported_modules(module) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or "").split(".")[0])
    return names


def test_far_ood_generators_import_only_dependencies_and_no_training_generator():
    allowed = {"__future__", "functools", "os", "unicodedata", "numpy", "PIL", "matplotlib", "sklearn"}
    assert _imported_modules(far_ood) <= allowed, _imported_modules(far_ood) - allowed
    # the far-OOD domains are built by far_ood and digits only: no glyph, shape or pre-training generator
    training = {"_glyph_domain", "generate_shapes", "generate_textures", "generate_pretrain_procedural",
                "_pretrain_domain", "glyphs"}
    for name in FAR_OOD_DOMAINS:
        used = set(DOMAINS[name].generate.__code__.co_names)
        assert not used & training, (name, used & training)
        assert used & {"generate_digits", "generate_photo_patches", "generate_scan_patches", "generate_cm_outline",
                       "generate_lowres_inverted"}, name


def test_photos_are_the_files_the_dependencies_ship():
    sklearn_images = Path(sklearn.__file__).parent / "datasets" / "images"
    matplotlib_data = Path(matplotlib.get_data_path()) / "sample_data"
    for file in ("china.jpg", "flower.jpg"):
        assert (sklearn_images / file).is_file()
    assert (matplotlib_data / "grace_hopper.jpg").is_file()
    photos = far_ood.photos()
    assert {p for p, _, _ in far_ood.PHOTO_REGIONS} == set(photos)
    for photo, region, (left, top, right, bottom) in far_ood.PHOTO_REGIONS:
        height, width = photos[photo].shape[:2]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, region
        assert min(right - left, bottom - top) >= 40, region  # room for crops that differ
    for file in ("s1045.ima.gz", "jacksboro_fault_dem.npz"):
        assert (matplotlib_data / file).is_file()
    scans = far_ood.scans()
    assert {s for s, _, _ in far_ood.SCAN_REGIONS} == set(scans)
    for scan, region, (left, top, right, bottom) in far_ood.SCAN_REGIONS:
        height, width = scans[scan].shape
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, region
        assert min(right - left, bottom - top) >= 40, region
    for font in far_ood.CM_FONTS:
        assert Path(far_ood.font_path(font)).is_file()
        assert Path(far_ood.font_path(font)).is_relative_to(Path(matplotlib.get_data_path()))


def test_far_ood_domains_generate_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("far-OOD generation opened a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for generate in (far_ood.generate_photo_patches, far_ood.generate_scan_patches, far_ood.generate_cm_outline,
                     far_ood.generate_lowres_inverted):
        images, labels, names = generate(2, NATIVE_SIZE, 0)
        assert len(images) == 2 * len(names) and images.dtype == np.uint8


# ---------------------------------------------------------------- disjoint from training by generator

def _family(font_file: str) -> str:
    with TTFont(os.path.join(glyphs.font_dir(), font_file), lazy=True) as font:
        return font["name"].getDebugName(1).lower()


def test_far_ood_typefaces_are_never_used_in_training():
    """Not the files, and not the families: no DejaVu or STIX face at all."""
    assert not set(far_ood.CM_FONTS) & set(glyphs.FONT_FILES)
    training = {_family(f) for f in glyphs.FONT_FILES}
    assert {family.split()[0] for family in training} == {"dejavu", "stix"} or training
    far = {_family(f) for f in far_ood.CM_FONTS} | {ImageFont.load_default(20).font.family.lower()}
    assert not far & training
    for family in far:
        assert not any(family.startswith(word) for word in ("dejavu", "stix")), family
    assert far_ood.RENDERERS["cm_outline"]["fonts"] == far_ood.CM_FONTS


def test_outline_renderer_draws_no_fill():
    """cm_outline's strokes are hollow: the inside of a filled glyph stays background (training glyphs are
    filled, dark on light, grey)."""
    for character in "08&@":
        filled_mask = far_ood.outline_mask(character, "cmb10.ttf", 56, 1, hollow=False)
        filled = np.asarray(filled_mask) > 127
        hollow = np.asarray(far_ood.outline_mask(character, "cmb10.ttf", 56, 1)) > 127
        # eroded by 2 px: what is left is the inside of the strokes (the outline reaches 1 px into them)
        inside = np.asarray(filled_mask.filter(ImageFilter.MinFilter(5))) > 127
        assert inside.sum() > 10, character
        assert not (hollow & inside).any() and hollow.sum() < filled.sum(), character


@pytest.fixture(scope="module")
def far_source(tmp_path_factory):
    return BuiltinSource([*FAR_OOD_DOMAINS, "latin", "shapes"], cache=tmp_path_factory.mktemp("far-cache"))


def _luma(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) @ [0.299, 0.587, 0.114] if images.ndim == 4 else images.astype(np.float64)


def test_renderer_settings_differ_from_training(far_source):
    latin, shapes = far_source["latin"].images, far_source["shapes"].images
    assert latin.ndim == 3  # training glyphs: grey, dark ink on a light ground
    assert np.median(_luma(latin)[:, [0, -1], :]) > 200
    for name in ("cm_outline", "lowres_inverted", "photo_patches"):
        images = far_source[name].images
        assert images.ndim == 4 and images.shape[-1] == 3, name  # colour
        assert np.abs(np.diff(images.astype(np.int16), axis=-1)).mean() > 8, name  # not grey as RGB
    # light on dark: the border is darker than the ink in every image
    inverted = _luma(far_source["lowres_inverted"].images)
    border = np.concatenate([inverted[:, [0, -1], :].reshape(len(inverted), -1),
                             inverted[:, :, [0, -1]].reshape(len(inverted), -1)], axis=1).mean(1)
    assert (border < 100).mean() > 0.95 and (inverted.reshape(len(inverted), -1).max(1) > 150).mean() > 0.95
    # the ground of cm_outline is a gradient, not the flat ground (plus pixel noise) of the procedural shapes
    def ground_spread(images):
        luma = _luma(images)
        return np.abs(luma[:, 1, 1:-1].mean(1) - luma[:, -2, 1:-1].mean(1)) + np.abs(
            luma[:, 1:-1, 1].mean(1) - luma[:, 1:-1, -2].mean(1))
    assert np.median(ground_spread(far_source["cm_outline"].images)) > 2 * np.median(ground_spread(shapes))
    assert far_ood.RENDERERS["lowres_inverted"]["resolution"] <= 16 < glyphs.CANVAS


def test_far_ood_class_counts_and_instances(far_source):
    for name in NEW_FAR_OOD:
        domain = far_source[name]
        assert len(domain.class_names) >= 10 and len(set(domain.class_names)) == len(domain.class_names)
        assert domain.images.shape[1:3] == (NATIVE_SIZE, NATIVE_SIZE) and domain.images.std() > 20
        assert domain.classes("test") == list(range(len(domain.class_names))) and not domain.classes("train")
        for label_ in range(len(domain.class_names)):
            items = [domain.load(label_, i) for i in range(domain.num_items(label_))]
            assert len(items) == 40 and len({item.tobytes() for item in items}) == 40, (name, label_)


# ---------------------------------------------------------------- disjoint from training by class identity

def training_characters() -> list[str]:
    accepted = glyphs.script_characters()
    return [c for domain in (*ID_DOMAINS, glyphs.PRETRAIN) if domain in accepted for c in accepted[domain]]


def test_far_ood_characters_are_no_training_class():
    """Not the code point, not in a training script's ranges, not a look-alike of any training character
    (twice the distance that keeps the glyph domains' classes apart), and no training character is a number."""
    characters = training_characters()
    assert not set(far_ood.CHARACTERS) & set(characters)
    ranges = [r for domain in (*ID_DOMAINS, glyphs.PRETRAIN) if domain in glyphs.SCRIPTS
              for r in glyphs.SCRIPTS[domain]]
    for character in far_ood.CHARACTERS:
        assert not any(start <= ord(character) <= stop for start, stop in ranges), character
    assert not [c for c in characters if unicodedata.numeric(c, None) is not None]
    train = np.stack([glyphs._canonical(c).ravel() for c in characters]).astype(np.float64)
    train_ink = (train * train).sum(1)
    for character in far_ood.CHARACTERS:
        canonical = glyphs._canonical(character)
        assert canonical is not None, character
        flat = canonical.ravel().astype(np.float64)
        ink = flat @ flat
        distance = ink + train_ink - 2 * train @ flat
        alike = distance < 2 * glyphs.DUPLICATE_INK * np.maximum(ink, train_ink)
        assert not alike.any(), (character, [characters[i] for i in np.flatnonzero(alike)])


def test_photo_and_scan_classes_are_distinct_regions():
    names = {f"{photo}: {region}" for photo, region, _ in far_ood.PHOTO_REGIONS}
    assert len(names) == len(far_ood.PHOTO_REGIONS) >= 16
    assert len({photo for photo, _, _ in far_ood.PHOTO_REGIONS}) == 3
    assert len({f"{scan}: {region}" for scan, region, _ in far_ood.SCAN_REGIONS}) == len(far_ood.SCAN_REGIONS) >= 10
    for regions in (far_ood.PHOTO_REGIONS, far_ood.SCAN_REGIONS):  # no two classes of one picture overlap much
        for i, (a, _, box_a) in enumerate(regions):
            for b, _, box_b in regions[i + 1:]:
                if a == b:
                    width = min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])
                    height = min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
                    smaller = min((r[2] - r[0]) * (r[3] - r[1]) for r in (box_a, box_b))
                    assert max(width, 0) * max(height, 0) < 0.25 * smaller, (box_a, box_b)


# ---------------------------------------------------------------- deterministic: the same bytes

@pytest.mark.parametrize("name", FAR_OOD_DOMAINS)
def test_far_ood_domains_are_deterministic(name):
    first = images_hash(name)
    assert images_hash(name) == first  # generated twice in one process
    if RECORDED.get(name):
        assert first == RECORDED[name], f"{name}'s images changed: bump FAR_OOD_TAG and record the new hash"


def test_building_twice_writes_the_same_arrays(tmp_path):
    for name in NEW_FAR_OOD:
        first = dict(np.load(builtin_module.build(name, tmp_path / "a")))
        second = dict(np.load(builtin_module.build(name, tmp_path / "b")))
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[k], second[k]) for k in first), name


# ---------------------------------------------------------------- reports and tables show the groups

def _results():
    rng = np.random.default_rng(0)
    results = {}
    for name, group in (("latin", "id"), ("braille", "near_ood"), ("textures", "near_ood"), ("digits", "far_ood"),
                        ("cm_outline", "far_ood")):
        base = rng.uniform(0.3, 0.7, 20)
        results[name] = {"role": "id" if group == "id" else "ood", "group": group, "smat": list(base + 0.02),
                         "pretrained": list(base)}
    return results


def test_report_shows_the_three_groups():
    results = _results()
    summary = summarise(results)
    assert list(summary["averages"]) == ["id", "near_ood", "far_ood", "ood"]
    assert summary["averages"]["far_ood"]["smat"] == pytest.approx(
        np.mean([summary["domains"][n]["smat"][0] for n in ("digits", "cm_outline")]))
    table = markdown_table(summary, results)
    for text in ("| braille | near-OOD |", "| digits | far-OOD |", "| latin | ID |", "**ID average**",
                 "**near-OOD average**", "**far-OOD average**", "**all OOD average**"):
        assert text in table, text
    # results without groups (image folders): ID and OOD as before
    plain = {name: {k: v for k, v in r.items() if k != "group"} for name, r in results.items()}
    assert list(summarise(plain)["averages"]) == ["id", "ood"]
    assert "**OOD average**" in markdown_table(summarise(plain), plain)


def test_tables_show_the_three_groups():
    rows = [ModeResult("r", "smat", "protonet", name, r["role"], r["smat"], 0.0, group=r["group"])
            for name, r in _results().items()]
    text = results_markdown(rows)
    for line in ("| textures | near-OOD |", "| cm_outline | far-OOD |", "**near-OOD average**", "**far-OOD average**"):
        assert line in text, line
    csv = results_csv(rows).splitlines()
    assert csv[0].startswith("domain,role,") and csv[0].endswith(",group")
    assert any(line.startswith("far_ood average,ood,") and line.endswith(",far_ood") for line in csv)
    assert any(line.startswith("braille,ood,") and line.endswith(",near_ood") for line in csv)
    # a ModeResult without a group (older callers) falls back to its role
    assert "| latin | ID |" in results_markdown([ModeResult("r", "smat", "protonet", "latin", "id", [0.5], 0.0)])


def test_groups_helpers():
    assert [label(g) for g in ("id", "near_ood", "far_ood", "ood")] == ["ID", "near-OOD", "far-OOD", "OOD"]
    assert in_group("far_ood", "ood") and in_group("near_ood", "ood") and not in_group("id", "ood")
    assert average_keys(["id", "far_ood"]) == ["id", "far_ood", "ood"] and average_keys(["id"]) == ["id"]


def _run(name, method, shift, tau=None, val=0.5):
    rng = np.random.default_rng(1)
    domains = {}
    for domain, group in (("latin", "id"), ("braille", "near_ood"), ("digits", "far_ood")):
        base = rng.uniform(0.3, 0.7, 100)
        domains[domain] = {"role": "id" if group == "id" else "ood", "group": group,
                           "accuracies": list(base + shift.get(group, 0.0))}
    return RunResult(RunSpec(name, method, tau=tau), Path(name), domains, val, [tau or 0.5] * 2, [[1, 0.02], [0.02, 1]],
                     {"latin": [[0.1, 0.9]] * 5, "braille": [[0.9, 0.1]] * 5, "digits": [[0.5, 0.5]] * 5})


def test_claims_c_and_d_are_judged_on_near_and_far_ood_separately():
    runs = [_run("pretrained", "pretrained", {}), _run("pmf", "pmf", {"id": 0.1, "near_ood": -0.02, "far_ood": -0.1})]
    for i, tau in enumerate((0.5, 0.9, 0.99)):  # near-OOD rises with τ, far-OOD falls
        runs.append(_run(f"smat_tau{tau:g}", "smat", {"id": 0.08 - 0.01 * i, "near_ood": 0.01 * i,
                                                       "far_ood": -0.05 - 0.01 * i}, tau=tau, val=0.6 - 0.01 * i))
    claims = judge_claims(runs)
    assert [(c.key, c.group) for c in claims] == [("a", ""), ("b", ""), ("c", "near_ood"), ("c", "far_ood"),
                                                  ("d", "near_ood"), ("d", "far_ood"), ("e", "")]
    by = {(c.key, c.group): c for c in claims}
    assert "near-OOD" in by["c", "near_ood"].statement and "far-OOD" in by["c", "far_ood"].statement
    assert by["c", "near_ood"].verdict == "holds" and by["c", "far_ood"].verdict == "holds"  # −0.05 > PMF's −0.1
    assert by["d", "near_ood"].verdict == "holds" and by["d", "far_ood"].verdict == "does not hold"
    assert paired_difference(runs[2], runs[0], "far_ood")[0] == pytest.approx(-5.0)
    assert any("pretrained" in line for line in by["c", "far_ood"].evidence)
