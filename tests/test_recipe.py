"""The recipe options (README, "Recipe options"): each one changes exactly what it names. One training step
(or one meta-loss) of a tiny SMAT model with and without the option, everything else equal, compared.
Also the fixed-MLP-experts row of Table 2: SMAT's router and masks, experts only on the MLP parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smat import model as methods
from smat.config import PACKAGE_CONFIGS, load_config, validate
from smat.model.backbone import create_builtin
from smat.model.hypernet import Hypernetwork
from smat.runtime.distributed import World
from smat.training import Trainer
from smat.training.objective import distillation
from smat.training.trainer import cosine_over_epochs

CONFIGS = PACKAGE_CONFIGS
TINY = ["data.n_way=3", "data.k_shot=2", "data.q_query=2", "train.val_episodes=1", "train.tasks_per_epoch=4",
        "train.meta_batch=2", "train.epochs=3", "train.alignment_every=0", "device=cpu", "train.tau=0.95"]


def trainer_for(tmp_path: Path, overrides=(), files=()) -> Trainer:
    config = validate(load_config(list(files), [*TINY, *overrides, f"output={tmp_path}"]))
    torch.manual_seed(0)
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    return Trainer(config, tmp_path, torch.device("cpu"), World(), lambda *args, **kwargs: None, model=model)


def first_batch(trainer: Trainer):
    return list(next(iter(trainer.batches())))


def meta_loss(tmp_path: Path, overrides=()) -> dict:
    trainer = trainer_for(tmp_path, overrides)
    tasks = first_batch(trainer)
    return trainer.objective(tasks, 0, 0, trainer.temperature(), trainer.multipliers)


def trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.trainable_tensors().items()}


def one_step(trainer: Trainer) -> tuple[dict, dict]:
    """(trained tensors before, after) one training step on the first meta-batch."""
    before = trained(trainer)
    trainer.train_step(first_batch(trainer))
    return before, trained(trainer)


# ---------------------------------------------------------------- the KD term


def test_kd_direction_student_teacher_is_the_reference_codes_kl_div_call():
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    temperature = 2.0
    # the reference code: kl_div(log_softmax(teacher / T), log_softmax(student / T), log_target=True) · T²
    reference = F.kl_div(F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1),
                         reduction="batchmean", log_target=True) * temperature ** 2
    hinton = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                      reduction="batchmean") * temperature ** 2
    torch.testing.assert_close(distillation(student, teacher, temperature, "student_teacher"), reference)
    torch.testing.assert_close(distillation(student, teacher, temperature, "teacher_student"), hinton)
    assert not torch.allclose(reference, hinton)


@pytest.mark.parametrize("override", ["train.kd_direction=student_teacher", "train.teacher_start=after_support_step",
                                      "train.kd_pretrained_share=0.5"])
def test_a_kd_option_changes_the_kd_term_and_nothing_else(tmp_path, override):
    ours, theirs = meta_loss(tmp_path / "ours"), meta_loss(tmp_path / "theirs", [override])
    for name in ("ce", "accuracy", "alpha_sum", "density", "hard_density"):  # the student is the same
        torch.testing.assert_close(ours[name], theirs[name])
    assert not torch.allclose(ours["kd"], theirs["kd"])


def test_the_teacher_after_the_support_step_starts_from_the_adapted_weights(tmp_path):
    trainer = trainer_for(tmp_path, ["train.teacher_start=after_support_step", "train.teacher_steps=0",
                                     "train.kd_pretrained_share=1.0"])
    # with K = 0 the teacher is its starting point; only the pre-trained share is left, so KD is unchanged
    tasks = first_batch(trainer)
    out = trainer.objective(tasks, 0, 0, trainer.temperature(), trainer.multipliers)
    assert float(out["kd"]) > 0


# ---------------------------------------------------------------- masks


def test_near_noiseless_noise_changes_the_sampled_masks_only(tmp_path):
    ours, theirs = trainer_for(tmp_path / "ours"), trainer_for(tmp_path / "theirs", ["train.noise=near_noiseless"])
    alpha = torch.full((2, ours.model.num_experts), 1.0 / ours.model.num_experts)
    for trainer in (ours, theirs):  # θ_δ = 0 at the start would hide the masks
        with torch.no_grad():
            trainer.model.delta.copy_(torch.linspace(-1, 1, trainer.model.delta.numel()))
    theta_ours = ours.objective.merge_task_parameters(alpha, 0, 0)
    theta_theirs = theirs.objective.merge_task_parameters(alpha, 0, 0)
    assert not torch.allclose(theta_ours, theta_theirs)
    for name, value in trained(ours).items():  # same model
        torch.testing.assert_close(value, trained(theirs)[name])


def test_the_log_alpha_clamp_bounds_log_alpha_and_nothing_else(tmp_path):
    wide = ["model.log_alpha_init_std=4"]  # so that some logits lie beyond ±4.6
    ours = trainer_for(tmp_path / "ours", wide)
    theirs = trainer_for(tmp_path / "theirs", [*wide, "model.log_alpha_range=[-4.60517, 4.60517]"])
    log_alpha = ours.model.log_alpha.detach()
    assert float(log_alpha.abs().max()) > 4.7
    torch.testing.assert_close(theirs.model.log_alpha.detach(), log_alpha.clamp(-4.60517, 4.60517))
    for name, value in trained(ours).items():
        if name != "log_alpha":
            torch.testing.assert_close(value, trained(theirs)[name])


# ---------------------------------------------------------------- schedules


def test_epoch_schedule_is_the_reference_codes():
    factor = cosine_over_epochs(steps_per_epoch=10, warmup_epochs=5, schedule_epochs=50)
    assert [factor(10 * epoch) for epoch in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(9) == 0.0 and factor(10 * 24) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(
        torch.pi * 19 / 45)).item()))


def test_the_epoch_schedule_changes_the_learning_rates_only(tmp_path):
    ours, theirs = trainer_for(tmp_path / "ours"), trainer_for(tmp_path / "theirs", ["train.lr_schedule=epochs",
                                                                                     "train.warmup_epochs=2"])
    before, after_ours = one_step(ours)
    _, after_theirs = one_step(theirs)
    # epoch 0 of the reference code's schedule has factor 0: θ_δ stays; ours moves it (log_α and the router
    # get no gradient while θ_δ = 0)
    assert torch.equal(after_theirs["delta"], before["delta"]) and not torch.equal(after_ours["delta"],
                                                                                   before["delta"])
    assert theirs.schedules["delta"].get_last_lr()[0] == 0.0  # still epoch 0
    assert theirs.lr_factor(theirs.steps_per_epoch) == pytest.approx(0.5)  # epoch 1 of 2 warm-up epochs
    assert float(theirs.multipliers.value.abs().sum()) == float(ours.multipliers.value.abs().sum())  # λ: no schedule


def test_the_first_epoch_lr_sets_delta_masks_and_lambda_and_leaves_the_router(tmp_path):
    ours, theirs = trainer_for(tmp_path / "ours"), trainer_for(tmp_path / "theirs", ["train.first_epoch_lr=1e-6"])
    rate = ours.schedules["delta"].get_last_lr()[0]
    assert theirs.schedules["delta"].get_last_lr()[0] == pytest.approx(1e-6)
    assert theirs.schedules["mask"].get_last_lr()[0] == pytest.approx(1e-6)
    assert theirs.schedules["hypernet"].get_last_lr() == ours.schedules["hypernet"].get_last_lr()
    before, after_ours = one_step(ours)
    _, after_theirs = one_step(theirs)
    # θ_δ starts at 0 and takes one SGD step: its move scales with the learning rate
    torch.testing.assert_close(after_theirs["delta"] - before["delta"],
                               (after_ours["delta"] - before["delta"]) * (1e-6 / rate))
    for name, value in after_ours.items():
        if name.startswith("hypernet."):
            torch.testing.assert_close(after_theirs[name], value)
    lambda_ours, lambda_theirs = ours.multipliers.value, theirs.multipliers.value
    assert float(lambda_ours.max()) > 0
    torch.testing.assert_close(lambda_theirs, lambda_ours * (1e-6 / ours.config.train.lambda_lr))


def test_the_lambda_schedule_scales_the_lambda_step_only(tmp_path):
    ours, theirs = trainer_for(tmp_path / "ours"), trainer_for(tmp_path / "theirs", ["train.lambda_schedule=true"])
    _, after_ours = one_step(ours)
    _, after_theirs = one_step(theirs)
    for name, value in after_ours.items():  # λ is 0 during the first step: the model's update is the same
        torch.testing.assert_close(after_theirs[name], value)
    assert float(ours.multipliers.value.max()) > 0
    torch.testing.assert_close(theirs.multipliers.value, ours.multipliers.value * ours.lr_factor(0))


def test_the_authors_preset_turns_every_option_on(tmp_path):
    config = load_config([CONFIGS / "vit_small_dino_metadataset.yaml", CONFIGS / "presets" / "authors_code.yaml"])
    train = config.train
    assert (train.kd_direction, train.teacher_start, train.noise, train.lr_schedule) == (
        "student_teacher", "after_support_step", "near_noiseless", "epochs")
    assert (train.kd_pretrained_share, train.first_epoch_lr, train.lambda_schedule) == (0.5, 1e-6, True)
    assert config.model.log_alpha_range == [-4.60517, 4.60517]
    assert config.config_files[-1].endswith("presets/authors_code.yaml")
    trainer = trainer_for(tmp_path, files=[CONFIGS / "presets" / "authors_code.yaml"])  # and on the built-in run
    assert trainer.train_step(first_batch(trainer))["skipped"] is False


# ---------------------------------------------------------------- Table 2, row 5


def test_fixed_mlp_experts_is_smat_with_experts_on_the_mlp_parameters_only():
    config = validate(load_config(CONFIGS / "ablations" / "fixed_mlp_experts.yaml"))
    smat = validate(load_config(None))
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    reference = methods.build(smat, create_builtin(smat.model.builtin, smat.model.image_size))
    assert type(model) is type(reference) is methods.SparseInterpolatedExperts and model.masked
    names = model.layout.names
    assert names and all(".mlp." in name for name in names)
    assert names == [name for name in reference.layout.names if ".mlp." in name]
    assert model.log_alpha.shape[0] == model.layout.num_elements < reference.layout.num_elements
    # SMAT's router: the same hypernetwork and its sigmoid scores, not SoftMerge's softmax
    assert isinstance(model.hypernet, Hypernetwork)
    assert type(model).merging_weights is methods.RoutedModel.merging_weights
    softmerge = validate(load_config(CONFIGS / "ablations" / "fixed_mlp_experts_softmerge.yaml"))
    assert softmerge.method == "softmerge" and softmerge.model.expert_patterns == config.model.expert_patterns
