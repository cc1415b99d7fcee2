"""Meta-test adaptation modes (smat.adapt) on a tiny untrained SMAT model over the built-in ViT.

Tasks are 3-way 2-shot with 2 queries per class from the built-in ``latin`` domain; fine-tuning runs
2–3 steps. θ_δ is drawn at random so that the experts differ from θ_pre and from each other.
"""

from __future__ import annotations

import pytest
import torch

from smat.adapt import AdaptConfig, validate_adapt
from smat.adapt.cost import CPU_KIND, PeakMemory, Stopwatch
from smat.adapt.finetune import backbone_accuracy, full_finetune, task_backbone
from smat.adapt.lora import add_lora, lora_finetune, lora_parameters, require_peft, target_pattern
from smat.adapt.select import binary_to_alpha, initial_binary, select_experts, support_losses
from smat.config import ConfigError
from smat.model.protonet import support_cross_entropy
from smat.training import objective

TEMPERATURE = 1.0


def clean_support_loss(backbone, task, scale=10.0) -> float:
    with torch.no_grad():
        return float(support_cross_entropy(backbone(task.support_x), task.support_y, task.n_way, scale))


# ---------------------------------------------------------------- the ProtoNet head


def test_support_cross_entropy_is_the_objective_support_loss(tiny):
    model, tasks = tiny
    theta = model.task_parameters(tasks[:1], TEMPERATURE)
    with torch.no_grad():
        expected = objective.support_loss(model, theta, tasks[:1])
        features = model.features(theta[0], tasks[0].support_x)
    actual = support_cross_entropy(features, tasks[0].support_y, tasks[0].n_way, model.protonet_scale)
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------- Algorithm 2


def test_binary_to_alpha_normalises_and_keeps_all_off_at_theta_pre(tiny):
    model, _ = tiny
    binary = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1], [0] * 8], dtype=torch.bool)
    alpha = binary_to_alpha(binary)
    torch.testing.assert_close(alpha[0], binary[0].float() / 3)
    assert torch.equal(alpha[1], torch.zeros(8))
    theta = model.merge(alpha)
    torch.testing.assert_close(theta[1], model.theta_pre)  # every expert off: the pre-trained weights


def test_initial_binary_is_the_rounded_hypernetwork_score(tiny):
    model, tasks = tiny
    binary = initial_binary(model, tasks, TEMPERATURE)
    alpha = model.task_alpha(tasks, TEMPERATURE, hard=True)
    for row, expected in zip(binary, alpha):
        if row.any():  # an all-off row is uniform in task_alpha (hypernet.normalise), θ_pre here
            torch.testing.assert_close(binary_to_alpha(row[None])[0], expected)


# ρ = 0 rejects every improvement and accepts everything worse: the walk only gets worse
@pytest.mark.parametrize("seed, rho", [(0, 0.9), (1, 0.9), (2, 0.9), (3, 0.0)])
def test_selection_never_ends_worse_than_it_starts(tiny, seed, rho):
    model, tasks = tiny
    task = tasks[seed % len(tasks)]
    selection = select_experts(model, task, TEMPERATURE, rounds=2, rho=rho,
                               generator=torch.Generator().manual_seed(seed))
    assert selection.best_loss <= selection.start_loss
    assert selection.evaluations == 1 + 2 * model.num_experts
    remeasured = float(support_losses(model, selection.binary[None], task)[0])
    assert remeasured == pytest.approx(selection.best_loss, rel=1e-5)
    start = initial_binary(model, [task], TEMPERATURE)
    assert float(support_losses(model, start, task)[0]) == pytest.approx(selection.start_loss, rel=1e-5)


def test_selection_scores_each_round_as_one_merge(tiny, monkeypatch):
    model, tasks = tiny
    shapes = []
    merge = model.merge

    def counting_merge(alpha, *args, **kwargs):
        shapes.append(tuple(alpha.shape))
        return merge(alpha, *args, **kwargs)

    monkeypatch.setattr(model, "merge", counting_merge)
    select_experts(model, tasks[0], TEMPERATURE, rounds=3, rho=0.9, generator=torch.Generator().manual_seed(0))
    m = model.num_experts
    assert shapes == [(1, m)] + [(m, m)] * 3  # the start, then one [M, M] batch of flips per round


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # no vmap batching rule for CPU flash attention
def test_candidate_losses_are_the_same_under_vmap(tiny):
    model, tasks = tiny
    candidates = torch.eye(model.num_experts, dtype=torch.bool)
    torch.testing.assert_close(support_losses(model, candidates, tasks[0], "vmap"),
                               support_losses(model, candidates, tasks[0], "loop"), rtol=1e-4, atol=1e-5)


def test_selection_starts_from_theta_pre_when_every_expert_is_off(tiny, monkeypatch):
    model, tasks = tiny
    task = tasks[0]
    monkeypatch.setattr(model, "expert_logits", lambda prototypes: torch.full((len(prototypes), 8), -20.0))
    assert not initial_binary(model, [task], TEMPERATURE).any()
    selection = select_experts(model, task, TEMPERATURE, rounds=1, rho=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert selection.start_loss == pytest.approx(clean_support_loss(model.backbone, task), rel=1e-5)
    assert selection.best_loss <= selection.start_loss


# ---------------------------------------------------------------- Algorithm 3 and LoRA


def test_task_backbone_holds_theta_i_and_shares_nothing(tiny):
    model, tasks = tiny
    theta = model.task_parameters(tasks[:1], TEMPERATURE)[0]
    backbone = task_backbone(model, theta)
    with torch.no_grad():
        torch.testing.assert_close(backbone(tasks[0].support_x), model.features(theta, tasks[0].support_x))
    pre = {p.data_ptr() for p in model.backbone.parameters()}
    assert not pre & {p.data_ptr() for p in backbone.parameters()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetuning_changes_parameters_and_lowers_the_support_loss(tiny, mode):
    model, tasks = tiny
    finetune, lr = {"full": (full_finetune, 1e-3), "lora": (lora_finetune, 1e-2)}[mode]
    task = tasks[0]
    theta = model.task_parameters([task], TEMPERATURE)[0]
    pre_before = model.theta_pre.clone()
    reference = dict(task_backbone(model, theta).named_parameters())
    before = clean_support_loss(task_backbone(model, theta), task)
    # no augmentation: the loss measured afterwards is the one that was optimised
    tuned = finetune(model, theta, task, lr, AdaptConfig(steps=3, augment_probability=0.0))
    assert len(tuned.losses) == 3
    assert clean_support_loss(tuned.backbone, task) < before
    parameters = dict(tuned.backbone.named_parameters())
    if mode == "full":
        changed = [name for name, p in parameters.items() if not torch.equal(p, reference[name])]
        assert len(changed) > len(parameters) // 2
    else:
        for name, p in parameters.items():
            if "lora_" not in name:  # θ_i itself stays frozen under the adapters
                assert torch.equal(p, reference[name.replace(".base_layer", "")])
        # B starts at zero: every adapter has moved
        assert all(float(p.detach().abs().max()) > 0 for name, p in parameters.items() if "lora_B" in name)
    assert torch.equal(model.theta_pre, pre_before)  # the meta-tuned model is untouched
    assert 0.0 <= backbone_accuracy(tuned.backbone, task, model.protonet_scale) <= 1.0


def test_full_finetuning_runs_with_augmentation(tiny):
    model, tasks = tiny
    generator = torch.Generator().manual_seed(0)
    tuned = full_finetune(model, None, tasks[1], 1e-3, AdaptConfig(steps=2), generator)
    assert len(tuned.losses) == 2
    with torch.no_grad():
        differences = [float((p - q).abs().max()) for p, q in zip(tuned.backbone.parameters(),
                                                                    model.backbone.parameters())]
    assert max(differences) > 0


def test_lora_adds_trainable_parameters_only_in_the_attention_projections(tiny):
    model, _ = tiny
    backbone = add_lora(task_backbone(model, None), AdaptConfig())
    trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
    assert trainable == [name for name, _ in backbone.named_parameters() if "lora_" in name]
    depth = len(model.backbone.blocks)
    assert len(trainable) == depth * 2 * 2  # qkv and proj of every block, A and B each
    for name in trainable:
        module = name.split(".lora_")[0]
        assert module.endswith(("attn.qkv", "attn.proj")) and "patch_embed" not in module
    options = AdaptConfig()
    for parameter in lora_parameters(backbone):
        assert options.lora_rank in parameter.shape
    modules = dict(backbone.named_modules())
    assert modules["blocks.0.attn.qkv"].scaling["default"] == pytest.approx(options.lora_alpha / options.lora_rank)


def test_lora_before_training_computes_theta_i(tiny):
    model, tasks = tiny
    theta = model.task_parameters(tasks[:1], TEMPERATURE)[0]
    backbone = add_lora(task_backbone(model, theta), AdaptConfig()).eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(tasks[0].query_x), model.features(theta, tasks[0].query_x))


def test_lora_target_pattern_skips_the_patch_embedding():
    import re

    pattern = target_pattern(["attn.qkv", "attn.proj"])
    assert re.fullmatch(pattern, "blocks.11.attn.proj")
    assert re.fullmatch(pattern, "blocks.0.attn.qkv")
    assert not re.fullmatch(pattern, "patch_embed.proj")


def test_lora_targets_that_match_nothing_are_a_config_error(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="lora_targets"):
        add_lora(task_backbone(model, None), AdaptConfig(lora_targets=["no_such_module"]))


# ---------------------------------------------------------------- options and cost


def test_learning_rate_grid_and_lora_scale():
    options = AdaptConfig()
    assert options.learning_rates("full") == [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert options.learning_rates("lora") == pytest.approx([0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert AdaptConfig(lr=1e-4).learning_rates("lora") == pytest.approx([1e-3])


def test_adapt_options_are_validated_and_coerced():
    options = validate_adapt(AdaptConfig(lr="1e-3", lr_grid=["0", "1e-4"]))  # YAML reads 1e-3 as a string
    assert options.lr == 1e-3 and options.lr_grid == [0.0, 1e-4]
    with pytest.raises(ConfigError) as error:
        validate_adapt(AdaptConfig(steps=-1, select_rho=2.0, lr_grid=[-1.0], lora_targets=[]))
    for key in ("adapt.steps", "adapt.select_rho", "adapt.lr_grid", "adapt.lora_targets"):
        assert key in str(error.value)


def test_peak_memory_on_cpu_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu"), poll_seconds=0.001) as memory:
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        watch = Stopwatch(torch.device("cpu"))
        with watch:
            float(block.sum())
        del block
    assert memory.kind == CPU_KIND
    if memory.bytes is not None:  # None only where the RSS cannot be read
        assert memory.bytes >= 32 * 2 ** 20
    assert watch.seconds > 0


@pytest.mark.parametrize("failure, expected", [
    (ModuleNotFoundError("No module named 'peft'", name="peft"), "which is not installed"),
    (ImportError("cannot import name 'CUDAProperties' from 'kernels'", name="kernels", path="/x/kernels/__init__.py"),
     "installed but failed to import: ImportError: cannot import name 'CUDAProperties' from 'kernels' "
     "(from /x/kernels/__init__.py)"),
])
def test_a_peft_that_fails_to_import_is_not_called_missing(monkeypatch, failure, expected):
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "peft":
            raise failure
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(ConfigError, match="mode lora needs") as caught:
        require_peft()
    assert expected in str(caught.value)
    assert ("pip install peft" in str(caught.value)) == (failure.name == "peft")
