"""The hypernetwork h_ζ: a task's support set → M expert scores → merging weights α.

Support features come from the frozen pre-trained backbone. Per task, the
class prototypes follow ``num_tokens`` learned tokens through one ViT block
(spectral norm on its Linear layers); output token 0, a learned query that
does not depend on the order of the classes, is compared with M learned keys.
Tasks of a meta-batch with different numbers of classes run in one call,
padded, with an attention mask.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Hypernetwork(nn.Module):
    def __init__(self, dim: int, num_experts: int, num_tokens: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % num_heads:
            num_heads = next(h for h in range(num_heads, 0, -1) if dim % h == 0)
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.keys = nn.Parameter(torch.randn(num_experts, dim) * dim ** -0.5)
        self.input_norm = nn.LayerNorm(dim)
        self.block = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True)
        for module in list(self.block.modules()):
            if isinstance(module, nn.Linear):
                spectral_norm(module)
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, prototypes: list[torch.Tensor]) -> torch.Tensor:
        """prototypes: one [n_way_b, D] tensor per task → logits fp32 [B, M]."""
        longest = max(p.shape[0] for p in prototypes)
        rows, valid = [], []
        for p in prototypes:
            padding = self.tokens.new_zeros(longest - p.shape[0], self.tokens.shape[1])
            rows.append(torch.cat([self.tokens, self.input_norm(p.float()), padding]))
            valid.append(torch.arange(rows[-1].shape[0], device=p.device) < self.tokens.shape[0] + p.shape[0])
        sequence, valid = torch.stack(rows), torch.stack(valid)
        mask = None
        if not bool(valid.all()):
            # additive key mask [B, 1, 1, L]: padded prototypes are never attended to
            mask = torch.zeros(valid.shape, dtype=sequence.dtype, device=sequence.device)
            mask = mask.masked_fill(~valid, float("-inf"))[:, None, None, :]
        out = self.output_norm(self.block(sequence, attn_mask=mask)[:, 0])
        return (out @ self.keys.t()).float()


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """A RelaxedBernoulli sample sigmoid((logits + log u − log(1 − u)) / T); ``generator=None``: its mean-free
    evaluation form sigmoid(logits / T)."""
    if generator is None:
        return torch.sigmoid(logits / temperature)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device, logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def normalise(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """α = scores / Σ_m scores; an all-zero row (every expert off) becomes uniform instead of NaN."""
    total = scores.sum(-1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[-1])
    return torch.where(total > eps, scores / total.clamp_min(eps), uniform)

