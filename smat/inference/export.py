"""The deployable form of a SMAT run: θ_pre, the packed experts and the hypernetwork.

``<export>/`` holds

- ``backbone.safetensors``: the frozen backbone (θ_pre and anything outside the experts' layout);
- ``experts.safetensors``: :class:`smat_kernels.PackedExperts` (per element the M expert bits of the
  binarised deterministic masks, θ_δ on their union support only, the support as a bitmap);
- ``hypernet.safetensors``: the hypernetwork h_ζ;
- ``config.yaml``: the run's config (architecture, image size, precision);
- ``export.json``: format version, the hypernetwork's temperature, the sizes, where it came from.

θ_δ [N] and log_α [N, M] are not kept: every task's weights come from one packed merge, which equals the
run's deterministic merge bit for bit where the masks are binary (``rounded == 0``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import smat_kernels

from ..config import (
    Config,
    ConfigError,
    ModelConfig,
    from_dict,
    merge_values,
    parse_override,
    read_config_file,
    validate,
)
from ..evaluation.runs import Run, load_run
from ..model import RoutedModel
from ..model.backbone import create_backbone
from ..runtime import checkpoint
from ..runtime.io import atomic_write_json, atomic_write_text, check_output_folder, ensure_writable_dir

FORMAT = "smat-export"
FORMAT_VERSION = 1
PACKED_KEYS = ("support_bitmap", "word_offsets", "expert_bits", "delta")
# what inference reads of a config: the model, the precision. The data section names folders of the
# training machine that need not exist where the model is used.
INFERENCE_OVERRIDES = ("data.source=builtin", "data.root=null", "data.train_domains=null", "data.test_domains=null",
                       "model.weights=null")


class PackedModel(RoutedModel):
    """SMAT with its experts in the packed deployment format: θ_i = packed_merge(θ_pre, packed, α_i).

    The hypernetwork, θ_pre and the features are those of :class:`~smat.model.RoutedModel`; only the merge
    differs (deterministic masks only: there is no log_α left to sample from)."""

    masked = True

    def __init__(self, backbone: nn.Module, config: ModelConfig, packed: smat_kernels.PackedExperts):
        self._num_experts = packed.num_experts
        super().__init__(backbone, config)
        if packed.n != self.layout.num_elements:
            raise checkpoint.CheckpointError(f"the packed experts hold N = {packed.n} elements but the backbone "
                                             f"{config.backbone!r} has {self.layout.num_elements}; export again "
                                             f"from the run")
        for name in PACKED_KEYS:
            self.register_buffer(f"packed_{name}", getattr(packed, name))
        self.rounded = packed.rounded

    def init_experts(self, config: ModelConfig, num_experts: int) -> None:
        """No trained expert tensors: the packed buffers are registered once the layout is known."""

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def packed(self) -> smat_kernels.PackedExperts:
        return smat_kernels.PackedExperts(self.layout.num_elements, self._num_experts, self.packed_support_bitmap,
                                          self.packed_word_offsets, self.packed_expert_bits, self.packed_delta,
                                          self.rounded)

    @classmethod
    def from_model(cls, model: RoutedModel, packed: smat_kernels.PackedExperts, config: ModelConfig) -> PackedModel:
        """The packed form of a loaded SMAT model: same backbone (shared), same hypernetwork (copied)."""
        packed_model = cls(model.backbone, config, packed.to(model.theta_pre.device))
        packed_model.hypernet.load_state_dict(model.hypernet.state_dict())
        return packed_model.to(model.theta_pre.device).eval()

    @torch.no_grad()
    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0) -> torch.Tensor:
        """θ [B, N] for merging weights ``alpha`` [B, M]: one packed merge for all tasks."""
        if mode != "deterministic":
            raise ValueError(f"packed experts merge with their deterministic masks only; got mode={mode!r}")
        return smat_kernels.packed_merge(self.theta_pre, self.packed, alpha.float().contiguous(),
                                         backend=self.backend)

    def hard_masks(self) -> torch.Tensor:
        raise NotImplementedError("the packed form keeps the union support, not each expert's mask as bool [N, M]")


def pack_experts(model) -> smat_kernels.PackedExperts:
    """Pack a SMAT model's θ_δ and deterministic masks (its ``rounded`` counts mask entries not in {0, 1})."""
    return smat_kernels.pack(model.delta.detach().to(model.theta_pre.dtype), model.log_alpha.detach(),
                             backend=model.backend)


def packable(model) -> bool:
    """Whether ``model`` is SMAT with one shared θ_δ [N] under M masks (what the packed format stores)."""
    return bool(model.masked and model.routed and hasattr(model, "log_alpha") and model.delta.ndim == 1)


@dataclass
class ExportReport:
    folder: Path
    files: dict[str, int]  # file name → bytes
    packed_bytes: int  # the packed experts' tensors
    dense_bytes: int  # θ_δ + log_α as the run stores them
    rounded: int  # mask entries rounded to {0, 1} by packing
    num_elements: int
    num_experts: int
    support: int  # elements on the union support

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.dense_bytes

    def summary(self) -> str:
        lines = [f"exported to {self.folder}"]
        lines += [f"  {name:<22} {size / 2**20:9.2f} MiB" for name, size in self.files.items()]
        lines.append(f"experts: packed {self.packed_bytes / 2**20:.2f} MiB vs dense θ_δ + log_α "
                     f"{self.dense_bytes / 2**20:.2f} MiB = {self.ratio:.3f} ({1 / self.ratio:.1f}× smaller; goal "
                     f"≤ 0.125: {'met' if self.ratio <= 0.125 else 'not met'})")
        lines.append(f"N = {self.num_elements:,} elements, M = {self.num_experts}; union support "
                     f"{self.support:,} ({self.support / max(self.num_elements, 1):.1%})")
        if self.rounded:
            lines.append(f"warning: {self.rounded:,} mask entries were neither 0 nor 1 and were rounded; the export "
                         f"approximates the run (equal bit for bit only where the masks are binary)")
        else:
            lines.append("masks binary: the export specialises bit for bit as the run does")
        return "\n".join(lines)


def export_run(run: Run | str | Path, output: str | Path, overwrite: bool = False) -> ExportReport:
    """Write the deployable form of a SMAT run (its best checkpoint) into ``output``.

    ``output`` may not hold a training run, nor (unless ``overwrite``) an export or any other file: an export
    never replaces what it did not write. Every file is written atomically."""
    check_output_folder(output, overwrite=overwrite)
    if not isinstance(run, Run):
        run = load_run(run, "cpu", INFERENCE_OVERRIDES)
    model = run.model
    if not packable(model):
        raise ConfigError(f"{run.path} is a {run.method} run; the packed format stores SMAT's shared θ_δ under "
                          f"binary masks (method smat). Use smat.load({str(run.path)!r}) directly")
    folder = ensure_writable_dir(check_output_folder(output, overwrite=overwrite))
    packed = pack_experts(model)
    checkpoint.write_tensors(packed.to("cpu").state_dict(), folder / "experts.safetensors")
    checkpoint.write_tensors({k: v.detach().clone() for k, v in model.backbone.state_dict().items()},
                             folder / "backbone.safetensors")
    checkpoint.write_tensors(model.hypernet.state_dict(), folder / "hypernet.safetensors")
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(run.config.to_dict(), sort_keys=False))
    dense = model.delta.numel() * model.delta.element_size() + model.log_alpha.numel() * model.log_alpha.element_size()
    record = {"format": FORMAT, "version": FORMAT_VERSION, "method": run.method,
              "backbone": run.config.model.backbone, "num_elements": packed.n, "num_experts": packed.num_experts,
              "temperature": run.temperature, "rounded": packed.rounded, "run": str(run.path),
              "step": run.state.get("step"), "packed_bytes": packed.nbytes(), "dense_bytes": dense}
    atomic_write_json(folder / "export.json", record)
    files = {name: (folder / name).stat().st_size for name in
             ("backbone.safetensors", "experts.safetensors", "hypernet.safetensors", "config.yaml", "export.json")}
    return ExportReport(folder, files, packed.nbytes(), dense, packed.rounded, packed.n, packed.num_experts,
                        packed.support_size)


def is_export(path: Path) -> bool:
    return (Path(path) / "export.json").is_file()


def read_export(path: str | Path, device: torch.device) -> tuple[PackedModel, Config, dict]:
    """(model, config, export.json) of an export folder; a foreign or damaged one is a CheckpointError."""
    folder = Path(path).expanduser()
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError) as error:
        raise checkpoint.CheckpointError(f"cannot read {folder / 'export.json'} ({error})") from None
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise checkpoint.CheckpointError(
            f"{folder} was written by another version of smat (format {record.get('format')!r} version "
            f"{record.get('version')!r}; this smat reads {FORMAT!r} version {FORMAT_VERSION}); export the run "
            f"again with `python -m smat.export RUN --output {folder}`")
    config = inference_config(folder / "config.yaml")
    try:
        packed = smat_kernels.PackedExperts.load(folder / "experts.safetensors", device="cpu")
        hypernet = load_file(str(folder / "hypernet.safetensors"))
    except (OSError, ValueError, TypeError) as error:
        raise checkpoint.CheckpointError(f"cannot read the export {folder}: {error}") from None
    model = PackedModel(create_backbone(config.model, weights=folder / "backbone.safetensors"), config.model, packed)
    try:
        model.hypernet.load_state_dict(hypernet)
    except RuntimeError as error:
        raise checkpoint.CheckpointError(f"{folder / 'hypernet.safetensors'} does not fit the hypernetwork of "
                                         f"{folder / 'config.yaml'}: {str(error).splitlines()[0]}") from None
    return model.to(device).eval(), config, record


def inference_config(path: Path) -> Config:
    """A run's or an export's config.yaml, with the data section neutralised (see INFERENCE_OVERRIDES)."""
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{path.parent} has no config.yaml; give a run folder written by "
                                         f"`python -m smat.train` or a folder written by `python -m smat.export`")
    try:  # the config reader's limits: UTF-8, size, anchors, duplicate keys, a mapping
        config = from_dict(read_config_file(path))
    except (ConfigError, TypeError, ValueError, AttributeError) as error:
        raise checkpoint.CheckpointError(f"{path} was written by another version of smat or is damaged ({error}); "
                                         f"use the smat version that trained it") from None
    for text in INFERENCE_OVERRIDES:
        merge_values(config, parse_override(text), "")
    return validate(config)
