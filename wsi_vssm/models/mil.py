"""Gated attention MIL (Ilse et al. 2018) over a slide's cells, plus a per-cell tumour head.

`pool` chooses the slide logit: "attention" (the gated attention pooling's classifier), "topk" (an affine map of
the mean of the `topk` highest cell logits) or "mix" (their sum, learned together). Files made before `pool`
existed are "attention".

The cell head reads the backbone's cell features directly, so it is trained first with the backbone on cell
labels (PCam's centre token); the attention pooling and slide classifier are then trained on cached features
with slide labels. The model returns named results and never computes a loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn


@dataclass
class MILConfig:
    in_dim: int  # width of a cell feature (the backbone's num_features)
    hidden_dim: int = 128
    attn_dim: int = 64
    dropout: float = 0.25
    pool: str = "attention"  # attention | topk | mix
    topk: int = 8  # cells in the top-k mean (topk and mix)

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"MIL pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if int(self.topk) < 1:
            raise ValueError(f"MIL topk must be >= 1, got {self.topk!r}")

    def to_dict(self) -> dict:
        return asdict(self)


POOLS = ("attention", "topk", "mix")


class MILOutput(NamedTuple):
    slide_logit: torch.Tensor  # (B,)
    attention: torch.Tensor  # (B, N) softmax weights over each bag's real cells; 0 at padding
    cell_logits: torch.Tensor  # (B, N) per-cell tumour logits


class AttentionMIL(nn.Module):
    def __init__(self, config: MILConfig):
        super().__init__()
        self.config = config
        c = config
        self.cell_head = nn.Linear(c.in_dim, 1)
        self.embed = nn.Sequential(nn.Linear(c.in_dim, c.hidden_dim), nn.ReLU(), nn.Dropout(c.dropout))
        self.attn_v = nn.Linear(c.hidden_dim, c.attn_dim)  # tanh branch
        self.attn_u = nn.Linear(c.hidden_dim, c.attn_dim)  # sigmoid gate
        self.attn_w = nn.Linear(c.attn_dim, 1)
        self.classifier = nn.Linear(c.hidden_dim, 1)
        if c.pool != "attention":
            self.topk_affine = nn.Linear(1, 1)  # slope and offset of the top-k mean of cell logits
            with torch.no_grad():
                self.topk_affine.weight.fill_(1.0)
                self.topk_affine.bias.zero_()

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """feats: (B, N, F) or (N, F) for one bag; mask: (B, N) bool, True for real cells (padding False)."""
        if feats.dim() == 2:
            feats = feats.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        feats = feats.float()
        cell_logits = self.cell_head(feats).squeeze(-1)  # (B, N)
        h = self.embed(feats)  # (B, N, H)
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        # A bag with no real cell has all -inf scores -> NaN weights; give it zero weight instead.
        attention = torch.nan_to_num(attention, nan=0.0)
        pooled = torch.einsum("bn,bnh->bh", attention, h)  # (B, H)
        slide = self.classifier(pooled).squeeze(-1)
        if self.config.pool != "attention":
            top = self.topk_affine(topk_mean(cell_logits, mask, self.config.topk)[:, None]).squeeze(-1)
            slide = top if self.config.pool == "topk" else slide + top
        return MILOutput(slide, attention, cell_logits)

    @torch.no_grad()
    def calibrate(self, a: float, b: float) -> None:
        """Make the slide logit a * logit + b (Platt scaling folded into the weights)."""
        for layer in (self.classifier, getattr(self, "topk_affine", None)):
            if layer is not None:
                layer.weight.mul_(a)
                layer.bias.mul_(a)
        (self.classifier if self.config.pool != "topk" else self.topk_affine).bias.add_(b)


def topk_mean(cell_logits: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, N) logits -> (B,): the mean of each bag's k highest real cells (all of them when it has fewer)."""
    x = cell_logits if mask is None else cell_logits.masked_fill(~mask, float("-inf"))
    k = min(int(k), x.shape[-1])
    top = x.topk(k, dim=-1).values  # (B, k)
    real = torch.isfinite(top)
    return torch.where(real, top, 0.0).sum(-1) / real.sum(-1).clamp_min(1)
