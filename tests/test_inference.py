"""Using a meta-tuned model: smat.load, specialise, predict, to_timm, save/load, the packed export, folder
test-only domains.

Runs are written the way ``python -m smat.train`` writes them (config.yaml, backbone.safetensors, the
Trainer's checkpoint) around an untrained tiny SMAT model, as in tests/test_evaluate.py. The "binary" run
has deterministic masks of exactly 0 or 1 (log_α at ±10), as a trained run has; the other run's masks are
fractional, so it merges densely.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import smat
from smat import model as methods
from smat.adapt import AdaptConfig
from smat.config import ConfigError, load_config, validate
from smat.data import DataError, ImageFolderSource
from smat.data import episodes as run_episodes
from smat.inference import PackedModel, export_run
from smat.model.backbone import create_builtin
from smat.runtime import checkpoint
from smat.runtime.distributed import World
from smat.runtime.io import save_config
from smat.training import Trainer

TINY = ["data.n_way=3", "data.k_shot=2", "data.q_query=2", "train.val_episodes=1", "train.tasks_per_epoch=4",
        "train.epochs=1", "device=cpu"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


def write_run(run: Path, binary: bool, overrides=()) -> Path:
    config = validate(load_config(None, [*TINY, f"output={run}", *overrides]))
    torch.manual_seed(0)
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    with torch.no_grad():
        model.delta.normal_(0.0, 0.1)
        if binary:  # 10% of each expert's entries on, as τ = 0.9 leaves a trained run
            model.log_alpha.copy_(torch.where(torch.rand_like(model.log_alpha) < 0.1, 10.0, -10.0))
    trainer = Trainer(config, run, torch.device("cpu"), World(), lambda *args, **kwargs: None, model=model)
    save_config(config, run / "config.yaml")
    checkpoint.save_backbone(run, model.backbone.state_dict())
    trainer.save(best=True)
    return run


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "binary", binary=True)


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "soft", binary=False)


def flat(specialist) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in specialist.weights.values()])


def picture(colour, seed: int, size=(40, 48), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def support_set(shots: int = 3):
    images = [picture(colour, 10 * i + k) for i, colour in enumerate(COLOURS.values()) for k in range(shots)]
    labels = [name for name in COLOURS for _ in range(shots)]
    return images, labels


# ---------------------------------------------------------------- specialise and predict


def test_specialize_and_predict(binary_run):
    model = smat.load(binary_run)
    assert model.merge_kind == "packed" and model.rounded == 0
    images, labels = support_set()
    specialist = model.specialize(images, labels)
    assert specialist.class_names == tuple(COLOURS)
    assert specialist.prototypes.shape == (3, model.task_model.backbone.num_features)
    queries = [picture(colour, 1000 + i) for i, colour in enumerate(COLOURS.values())]
    predictions = specialist.predict(queries)
    assert len(predictions) == 3 and predictions.probabilities.shape == (3, 3)
    assert torch.allclose(predictions.probabilities.sum(-1), torch.ones(3))
    assert set(predictions.labels) <= set(COLOURS)
    assert predictions.confidence.shape == (3,)


def test_packed_merge_equals_dense_merge_bit_for_bit(binary_run):
    images, labels = support_set()
    queries = torch.stack([torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    packed = smat.load(binary_run).specialize(images, labels)
    dense = smat.load(binary_run, merge="dense").specialize(images, labels)
    assert torch.equal(flat(packed), flat(dense))
    assert torch.equal(packed.predict(queries).probabilities, dense.predict(queries).probabilities)


def test_fractional_masks_merge_densely(soft_run):
    model = smat.load(soft_run)
    assert model.merge_kind == "dense" and model.rounded > 0
    with pytest.warns(UserWarning, match="rounds"):
        assert smat.load(soft_run, merge="packed").merge_kind == "packed"


def test_inputs_of_any_kind_size_and_mode(binary_run, tmp_path):
    model = smat.load(binary_run)
    specialist = model.specialize(*support_set())
    red = picture(COLOURS["red"], 7, size=(100, 60))
    red.save(tmp_path / "red.png")
    picture(COLOURS["red"], 7, size=(100, 60), mode="L").save(tmp_path / "grey.png")
    picture(COLOURS["red"], 7, size=(100, 60), mode="RGBA").save(tmp_path / "alpha.png")
    picture(COLOURS["red"], 7, size=(100, 60), mode="P").save(tmp_path / "palette.gif")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    tensor = torch.from_numpy(np.array(red)).permute(2, 0, 1).float() / 255
    inputs = [tmp_path / "red.png", str(tmp_path / "grey.png"), tmp_path / "alpha.png", tmp_path / "palette.gif",
              tmp_path / "broken.jpg", red, tensor, (tensor * 255).to(torch.uint8), np.asarray(red)]
    predictions = specialist.predict(inputs)
    assert len(predictions) == 8 and predictions.kept == [0, 1, 2, 3, 5, 6, 7, 8]
    assert [name for name, _ in predictions.skipped] == [str(tmp_path / "broken.jpg")]
    # the same picture as a file, a PIL image, a uint8 tensor and an array is the same input, bit for bit ...
    images = model.preprocess(inputs).images
    path, pil, as_float, as_uint8, array = (images[i] for i in (0, 4, 5, 6, 7))
    assert torch.equal(path, pil) and torch.equal(pil, as_uint8) and torch.equal(pil, array)
    assert torch.allclose(pil, as_float, atol=1e-5)
    # ... and gets the same prediction (up to the rounding of its row of a batched matrix product)
    path, pil, as_float, as_uint8, array = (predictions.probabilities[i] for i in (0, 4, 5, 6, 7))
    for other in (pil, as_float, as_uint8, array):
        assert torch.allclose(path, other, atol=1e-5)


@pytest.mark.parametrize("mode", ["select", "full", "lora"])
def test_other_modes(binary_run, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    model = smat.load(binary_run)
    images, labels = support_set(2)
    specialist = model.specialize(images, labels, mode, options=AdaptConfig(steps=2, select_rounds=1))
    assert specialist.mode == mode and len(specialist.predict(images)) == 6
    logits = specialist.logits(model.preprocess(images).images)
    assert torch.allclose(specialist.to_timm()(model.preprocess(images).images), logits, atol=1e-4)


# ---------------------------------------------------------------- to_timm, save, load


def test_to_timm_gives_the_specialists_logits_with_nothing_of_smat(binary_run):
    model = smat.load(binary_run)
    specialist = model.specialize(*support_set())
    images = model.preprocess([picture(c, 50 + i) for i, c in enumerate(COLOURS.values())]).images
    plain = specialist.to_timm()
    assert torch.allclose(plain(images), specialist.logits(images), atol=1e-5)
    foreign = [type(m).__module__ for m in plain.modules() if type(m).__module__.split(".")[0] == "smat"]
    assert not foreign
    # its weights are the task's, not θ_pre's
    merged = torch.cat([p.reshape(-1) for n, p in plain.named_parameters() if not n.startswith("head")])
    assert not torch.equal(merged, model.task_model.theta_pre)


def test_save_and_load_specialist_round_trip(binary_run, tmp_path):
    model = smat.load(binary_run)
    specialist = model.specialize(*support_set())
    specialist.save(tmp_path / "colours")
    record = json.loads((tmp_path / "colours" / "specialist.json").read_text())
    assert record["class_names"] == list(COLOURS)
    loaded = smat.load_specialist(tmp_path / "colours")
    queries = [picture(c, 90 + i) for i, c in enumerate(COLOURS.values())]
    assert torch.equal(loaded.predict(queries).probabilities, specialist.predict(queries).probabilities)
    with pytest.raises(checkpoint.CheckpointError, match="load_specialist"):
        smat.load(tmp_path / "colours")


# ---------------------------------------------------------------- export


def test_export_is_smaller_and_specialises_identically(binary_run, tmp_path):
    report = export_run(binary_run, tmp_path / "export")
    assert report.rounded == 0 and report.packed_bytes < report.dense_bytes
    # θ_δ [N] + log_α [N, 8] in fp32 against bits, bitmap and θ_δ on the ~57% union support of 8 experts at 10%
    assert report.ratio < 0.125
    exported = smat.load(tmp_path / "export")
    assert isinstance(exported.task_model, PackedModel)
    run = smat.load(binary_run)
    images, labels = support_set()
    queries = [picture(c, 70 + i) for i, c in enumerate(COLOURS.values())]
    for mode in ("protonet", "select"):
        options = AdaptConfig(select_rounds=2)
        a, b = run.specialize(images, labels, mode, options=options), exported.specialize(images, labels, mode,
                                                                                         options=options)
        assert torch.equal(flat(a), flat(b))
        assert torch.equal(a.predict(queries).probabilities, b.predict(queries).probabilities)


def test_export_of_another_version_or_method_is_refused(binary_run, tmp_path):
    export_run(binary_run, tmp_path / "export")
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    (tmp_path / "export" / "export.json").write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(checkpoint.CheckpointError, match="another version of smat"):
        smat.load(tmp_path / "export")


# ---------------------------------------------------------------- bad input


def test_bad_support_sets_say_what_to_fix(binary_run, tmp_path):
    model = smat.load(binary_run)
    with pytest.raises(DataError, match="at least 2 classes"):
        model.specialize([picture(COLOURS["red"], 1)] * 2, ["red", "red"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="broken.png"), pytest.raises(DataError, match="'blue' has no readable"):
        model.specialize([picture(COLOURS["red"], 1), tmp_path / "broken.png"], ["red", "blue"])
    with pytest.raises(ValueError, match="labels"):
        model.specialize([picture(COLOURS["red"], 1)], ["red", "blue"])


def test_a_run_of_another_backbone_or_version_is_one_clear_error(binary_run, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(binary_run, foreign)
    text = (foreign / "config.yaml").read_text()
    (foreign / "config.yaml").write_text(text.replace("num_experts: 8", "num_experts: 4"))
    with pytest.raises(checkpoint.CheckpointError, match="model.num_experts: 4 there, 8 in the checkpoint"):
        smat.load(foreign)
    (foreign / "config.yaml").write_text(text + "\nfuture_section: {x: 1}\n")
    with pytest.raises(checkpoint.CheckpointError, match="another version"):
        smat.load(foreign)
    with pytest.raises(checkpoint.CheckpointError, match="neither a run folder"):
        smat.load(tmp_path)


# ---------------------------------------------------------------- folder domains as OOD test domains


def image_tree(root: Path, domains: dict[str, int], images: int = 4) -> Path:
    for d, (domain, classes) in enumerate(domains.items()):
        for c in range(classes):
            folder = root / domain / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(images):
                picture((20 * c % 255, 90, 30 * d), 100 * c + i, size=(24, 24)).save(folder / f"{i}.png")
    return root


def test_test_only_folder_domain_tests_every_class(tmp_path):
    root = image_tree(tmp_path / "data", {"parts": 20, "tools": 6})
    config = validate(load_config(None, TINY + ["data.source=folder", f"data.root={root}",
                                                "data.test_only=[tools]", "evaluate.episodes=20"]))
    source = run_episodes.open_source(config)
    assert source["tools"].classes("test") == list(range(6)) and not source["tools"].classes("train")
    assert run_episodes.train_domains(config, source) == ["parts"]
    assert run_episodes.domain_role("tools", source) == "ood" and run_episodes.domain_role("parts", source) == "id"
    dataset = run_episodes.test_datasets(config, source)["tools"]
    tested = {name for i in range(len(dataset)) for name in dataset[i].class_names}
    assert tested == {f"class{c:02d}" for c in range(6)}
    with pytest.raises(ConfigError, match="data.test_only"):
        run_episodes.open_source(validate(load_config(None, TINY + ["data.source=folder", f"data.root={root}",
                                                                     "data.test_only=[toys]"])))


def test_splits_file_is_read(tmp_path):
    root = image_tree(tmp_path / "data", {"parts": 6})
    splits = tmp_path / "splits.json"
    names = [f"class{c:02d}" for c in range(6)]
    splits.write_text(json.dumps({"parts": {"train": names[:3], "val": names[3:4], "test": names[4:]}}))
    config = validate(load_config(None, TINY + ["data.source=folder", f"data.root={root}", f"data.splits={splits}"]))
    assert run_episodes.open_source(config)["parts"].classes("test") == [4, 5]
    with pytest.raises(ConfigError, match="data.splits"):
        validate(load_config(None, TINY + [f"data.splits={splits}"]))  # the built-in source has no splits file


def test_test_folders_join_the_runs_domains_as_ood(tmp_path):
    root = image_tree(tmp_path / "mine", {"parts": 5})
    single = tmp_path / "tools"
    image_tree(tmp_path, {"tools": 4})
    config = validate(load_config(None, TINY + [f"data.test_folders=[{root},{single}]"]))
    source = run_episodes.open_source(config)
    names = run_episodes.test_domains(config, source)
    assert names[-2:] == ["parts", "tools"] and "latin" in names
    assert {run_episodes.domain_role(n, source) for n in ("parts", "tools")} == {"ood"}
    assert run_episodes.domain_role("latin", source) == "id"
    assert source["parts"].classes("test") == list(range(5))
    assert isinstance(source.folders["tools"], ImageFolderSource)
