"""The meta-test protocols of PMF (hushell/pmf_cvpr22, models/deploy.py), smat's defaults: prototypes from
the clean support images while fine-tuning, the learning rate chosen per task from the support set alone
where a domain has no val split, LoRA on query and value slices of timm's fused qkv, and PMF's learnable
cosine head. A tiny untrained SMAT model over the built-in ViT, 3-way 2-shot tasks of ``latin``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from smat import model as methods
from smat.adapt import AdaptConfig, validate_adapt
from smat.adapt.finetune import (
    backbone_accuracy,
    choose_task_lr,
    fine_tune,
    full_finetune,
    support_probe,
    task_backbone,
)
from smat.adapt.lora import SlicedLoRA, add_lora, lora_finetune, lora_parameters
from smat.config import PACKAGE_CONFIGS, ConfigError, load_config, validate
from smat.data.transforms import diff_augment
from smat.evaluation import modes, runs
from smat.model import protonet
from smat.model.backbone import create_builtin
from smat.model.protonet import support_cross_entropy
from smat.training.specs import SPECS, make_optimizers

CONFIGS = PACKAGE_CONFIGS
TEMPERATURE = 1.0
QV = ["attn.q", "attn.v"]


def features_logits(backbone, task):
    with torch.no_grad():
        return protonet.task_logits(backbone(torch.cat([task.support_x, task.query_x])), task, 10.0)


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("method, targets", [(full_finetune, None), (lora_finetune, QV)])
def test_finetuning_at_lr_0_is_protonet(tiny, method, targets):
    model, tasks = tiny
    task = tasks[0]
    theta = model.task_parameters([task], TEMPERATURE)
    options = AdaptConfig(steps=3, **({"lora_targets": targets} if targets else {}))
    tuned = method(model, theta[0], task, 0.0, options, torch.Generator().manual_seed(0))
    with torch.no_grad():
        (expected,) = protonet.query_logits(model, theta, [task])
    torch.testing.assert_close(features_logits(tuned.backbone, task), expected)
    assert backbone_accuracy(tuned.backbone, task, 10.0) == protonet.accuracy(expected, task.query_y)


def test_the_support_loss_classifies_augmented_images_against_clean_prototypes(tiny):
    model, tasks = tiny
    task = tasks[0]
    backbone = task_backbone(model, None)
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)
    losses = {}
    for prototypes in ("clean", "augmented"):
        losses[prototypes] = fine_tune(backbone, list(backbone.parameters()), task, 0.0, 1, 10.0, 1.0,
                                       generator=torch.Generator().manual_seed(5), prototypes=prototypes)[0]
    images = diff_augment(task.support_x, torch.Generator().manual_seed(5), 1.0)
    with torch.no_grad():
        clean = support_cross_entropy(backbone(images), task.support_y, task.n_way, 10.0, 0.0,
                                      backbone(task.support_x))
        augmented = support_cross_entropy(backbone(images), task.support_y, task.n_way, 10.0)
    assert losses["clean"] == pytest.approx(float(clean), rel=1e-5)
    assert losses["augmented"] == pytest.approx(float(augmented), rel=1e-5)
    assert losses["clean"] != pytest.approx(losses["augmented"])
    assert AdaptConfig().prototypes == "clean"


# ---------------------------------------------------------------- the learning rate per task


def test_the_probe_takes_one_image_per_class_as_prototypes_and_scores_the_rest(tiny):
    _, tasks = tiny
    task = tasks[0]
    probe = support_probe(task)
    assert sorted(probe.support_y.tolist()) == list(range(task.n_way))
    assert len(probe.query_y) == len(task.support_y) - task.n_way
    first = [int((task.support_y == c).nonzero()[0, 0]) for c in range(task.n_way)]
    assert torch.equal(probe.support_x, task.support_x[first])


@pytest.mark.parametrize("method", [full_finetune, lora_finetune])
def test_the_per_task_lr_choice_never_reads_the_query(tiny, method):
    model, tasks = tiny
    task = tasks[1]
    theta = model.task_parameters([task], TEMPERATURE)[0]
    options = AdaptConfig(steps=2, lora_targets=QV)
    rates = [0.0, 1e-3, 1e-1]

    def choose(candidate):
        torch.manual_seed(0)  # LoRA's dropout draws from the global generator
        return choose_task_lr(method, model, theta, candidate, rates, options, torch.Generator().manual_seed(1))

    rate, scores = choose(task)
    poisoned = SimpleNamespace(**{**vars(task), "query_y": torch.randint(0, 99, task.query_y.shape),
                                  "query_x": torch.full_like(task.query_x, float("nan"))})
    poisoned.n_way = task.n_way
    assert choose(poisoned) == (rate, scores)
    # and without any query at all
    blind = SimpleNamespace(support_x=task.support_x, support_y=task.support_y, n_way=task.n_way,
                            domain=task.domain, class_names=task.class_names)
    assert choose(blind) == (rate, scores)
    assert set(scores) == set(rates) and rate in rates


def test_one_image_per_class_leaves_nothing_to_score_and_keeps_the_smallest_rate(tiny):
    model, tasks = tiny
    task = tasks[0]
    one_shot = SimpleNamespace(support_x=task.support_x[:3], support_y=torch.arange(3), n_way=3,
                               domain=task.domain, class_names=task.class_names)
    assert choose_task_lr(full_finetune, model, None, one_shot, [1e-3, 0.0], AdaptConfig(steps=1)) == (0.0, {})


TINY_RUN = ["data.n_way=3", "data.k_shot=2", "data.q_query=2", "device=cpu", "evaluate.episodes=1"]


def tiny_run(tmp_path, overrides=()):
    config = validate(load_config(None, [*TINY_RUN, *overrides]))
    torch.manual_seed(0)
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    return runs.Run(tmp_path, config, model, {"tasks_seen": 0}, torch.device("cpu"))


def test_a_domain_without_val_split_chooses_per_task_from_its_support(tmp_path):
    run = tiny_run(tmp_path, ["data.test_domains=[latin, digits]"])
    options = AdaptConfig(steps=1, lr_grid=[0.0, 1e-3], lr_tasks=1)
    plan = modes.plan_run(run, ["full"], options)
    assert plan.lr_sets["digits"] == (None, "support") and plan.lr_sets["latin"][1] == "val"
    results, _ = modes.evaluate_mode(plan, "full", options)
    by_domain = {result.domain: result for result in results}
    digits = by_domain["digits"]
    assert digits.lr is None and digits.lr_split == "support"
    assert set(digits.lr_scores) <= {0.0, 1e-3} and sum(digits.lr_scores.values()) == pytest.approx(1.0)
    assert by_domain["latin"].lr_split == "val"
    legacy = AdaptConfig(steps=1, lr_grid=[0.0, 1e-3], lr_tasks=1, lr_choice="val_else_test")
    assert modes.plan_run(run, ["full"], legacy).lr_sets["digits"][1] == "test"
    everywhere = AdaptConfig(lr_choice="support")
    assert {split for _, split in modes.plan_run(run, ["full"], everywhere).lr_sets.values()} == {"support"}


def test_adaptation_options_are_checked():
    with pytest.raises(ConfigError) as error:
        validate_adapt(AdaptConfig(prototypes="noisy", lr_choice="test"))
    assert "adapt.prototypes" in str(error.value) and "adapt.lr_choice" in str(error.value)


# ---------------------------------------------------------------- LoRA on query and value


def test_lora_on_query_and_value_slices_of_the_fused_qkv(tiny):
    model, tasks = tiny
    options = AdaptConfig(lora_targets=QV)
    backbone = add_lora(task_backbone(model, None), options)
    depth = len(model.backbone.blocks)
    qkv = [module for module in backbone.modules() if isinstance(module, SlicedLoRA)]
    assert len(qkv) == depth and all(module.slices == ["q", "v"] for module in qkv)
    trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
    assert len(trainable) == depth * 2 * 2  # q and v of every block, A and B each
    assert all(".attn.qkv.lora_" in name for name in trainable) and len(lora_parameters(backbone)) == len(trainable)
    tuned = lora_finetune(model, None, tasks[0], 1e-2, AdaptConfig(steps=2, lora_targets=QV,
                                                                    augment_probability=0.0))
    layer = tuned.backbone.blocks[0].attn.qkv
    x = torch.randn(5, layer.base_layer.in_features)
    with torch.no_grad():
        out, base = layer(x), layer.base_layer(x)
    third = layer.dim
    torch.testing.assert_close(out[:, third:2 * third], base[:, third:2 * third])  # k untouched
    assert not torch.allclose(out[:, :third], base[:, :third]) and not torch.allclose(out[:, 2 * third:],
                                                                                       base[:, 2 * third:])


def test_a_target_named_whole_and_by_slice_is_a_config_error(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="both whole and by slice"):
        add_lora(task_backbone(model, None), AdaptConfig(lora_targets=["attn.qkv", "attn.q"]))


# ---------------------------------------------------------------- PMF's head


def test_pmf_learns_its_cosine_scale_and_bias(tmp_path):
    config = validate(load_config(CONFIGS / "baselines" / "pmf.yaml", TINY_RUN))
    assert config.model.pmf_head == "learnable"
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    assert [float(p) for p in model.head_parameters()] == [10.0, 0.0]
    with torch.no_grad():
        model.protonet_scale.fill_(4.0)
        model.protonet_bias.fill_(0.25)
    features, centroids = torch.randn(4, 8), torch.randn(3, 8)
    cosine = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(centroids, dim=-1).t()
    torch.testing.assert_close(protonet.cosine_logits(features, centroids, model.protonet_scale,
                                                      model.protonet_bias), 4.0 * (cosine + 0.25))
    optimizer = make_optimizers(SPECS["pmf"], model, config.train)["delta"]
    assert any(p is model.protonet_scale for group in optimizer.param_groups for p in group["params"])
    fixed = validate(load_config(None, ["method=pmf", "model.pmf_head=fixed"]))
    assert methods.build(fixed, create_builtin(fixed.model.builtin, fixed.model.image_size)).head_parameters() == []
