"""Gated attention MIL (Ilse et al. 2018) over a slide's cells, plus a per-cell tumour head.

`pool` chooses the slide logit: "attention" (the gated attention pooling's classifier), "topk" (an affine map of
the mean of the `topk` highest cell logits), "mix" (their sum, learned together) or "count" (an affine map of
log(1 + the number of cells at or above `count_threshold`, a cell logit) and log(the number of cells): how much
of the heatmap is tumour, weighed against how many cells could have been false alarms). Files made before
`pool` existed are "attention".

`size_slope` adds size_slope * log(cells) to every pool's slide logit. A slide head fitted on small slides
drifts as bags grow, because a larger normal slide has more cells that can look like tumour; the calibration
(`calibrate`) fits this term on slides of many sizes so that the same probability means the same at every size.
Files made before it existed have 0.

`members` > 1 makes the slide head an ensemble (`MILEnsemble`): that many heads of the same pool, trained with
different seeds, whose slide logits are averaged. One head's fit moves with its seed alone (by up to 0.03 AUC on
the recipe's validation mosaics); their mean does not depend on one draw. The cell head is one, shared. Files
made before it existed have 1. `make_mil(config)` builds either.

The cell head reads the backbone's cell features directly, so it is trained first with the backbone on cell
labels (PCam's centre token); the attention pooling and slide classifier are then trained on cached features
with slide labels. The model returns named results and never computes a loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import nn


@dataclass
class MILConfig:
    in_dim: int  # width of a cell feature (the backbone's num_features)
    hidden_dim: int = 128
    attn_dim: int = 64
    dropout: float = 0.25
    pool: str = "attention"  # attention | topk | mix | count
    topk: int = 8  # cells in the top-k mean (topk and mix)
    count_threshold: float = 0.0  # cell logit at and above which a cell counts (count): the model's cell threshold
    size_slope: float = 0.0  # slide logit per e-fold of cells, added to every pool's (set by `calibrate`)
    members: int = 1  # slide heads whose logits are averaged (MILEnsemble); 1: one head (AttentionMIL)

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"MIL pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if int(self.topk) < 1:
            raise ValueError(f"MIL topk must be >= 1, got {self.topk!r}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or not 1 <= self.members <= MAX_MEMBERS:
            raise ValueError(f"MIL members must be an integer from 1 to {MAX_MEMBERS}, got {self.members!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["members"] == 1:  # a single head's file stays readable by versions before ensembles
            del d["members"]
        return d


POOLS = ("attention", "topk", "mix", "count")
TOPK_POOLS = ("topk", "mix")  # the pools that read `topk`


def head_name(pool: str, topk: int) -> str:
    """A slide head's short name: its pool, with its top-k where it reads one (`attention`, `mix16`)."""
    return f"{pool}{topk}" if pool in TOPK_POOLS else pool


def head_summary(cfg) -> dict:
    """A slide head in outputs (`info`, metrics.json's `model`): its pool (with its top-k where it reads one), how
    many seeds' heads it averages, and whether a bag-size term is in its calibration."""
    return {"pool": head_name(cfg.pool, cfg.topk), "members": cfg.members, "size_term": cfg.size_slope != 0}


MAX_MEMBERS = 64  # more heads than this in one file is no real model


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
        if c.pool in TOPK_POOLS:
            self.topk_affine = nn.Linear(1, 1)  # slope and offset of the top-k mean of cell logits
            with torch.no_grad():
                self.topk_affine.weight.fill_(1.0)
                self.topk_affine.bias.zero_()
        if c.pool == "count":
            self.count_affine = nn.Linear(2, 1)  # weights of log(1 + cells counted) and log(cells)
            with torch.no_grad():
                self.count_affine.weight.copy_(torch.tensor([[1.0, -0.5]]))
                self.count_affine.bias.zero_()

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """feats: (B, N, F) or (N, F) for one bag; mask: (B, N) bool, True for real cells (padding False)."""
        feats, mask = _batched(feats, mask)
        cell_logits = self.cell_head(feats).squeeze(-1)  # (B, N)
        slide, attention = self.slide_logit(feats, mask, cell_logits)
        if self.config.size_slope:
            slide = slide + self.config.size_slope * log_cells(cell_logits, mask)
        return MILOutput(slide, attention, cell_logits)

    def slide_logit(self, feats: torch.Tensor, mask: torch.Tensor | None,
                    cell_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, F) float features and their (B, N) cell logits -> this head's slide logit before the size term
        (B,) and its attention weights (B, N)."""
        h = self.embed(feats)  # (B, N, H)
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        # A bag with no real cell has all -inf scores -> NaN weights; give it zero weight instead.
        attention = torch.nan_to_num(attention, nan=0.0)
        pooled = torch.einsum("bn,bnh->bh", attention, h)  # (B, H)
        slide = self.classifier(pooled).squeeze(-1)
        pool = self.config.pool
        if pool in TOPK_POOLS:
            top = self.topk_affine(topk_mean(cell_logits, mask, self.config.topk)[:, None]).squeeze(-1)
            slide = top if pool == "topk" else slide + top
        elif pool == "count":
            slide = self.count_affine(count_stats(cell_logits, mask, self.config.count_threshold)).squeeze(-1)
        return slide, attention

    def slide_layers(self) -> list[nn.Linear]:
        """The layers whose outputs add up to the slide logit; the first holds its offset."""
        names = {"attention": ["classifier"], "topk": ["topk_affine"], "mix": ["classifier", "topk_affine"],
                 "count": ["count_affine"]}[self.config.pool]
        return [getattr(self, n) for n in names]

    @torch.no_grad()
    def calibrate(self, a: float, b: float, c: float = 0.0) -> None:
        """Make the slide logit a * logit + b + c * log(cells) (Platt scaling, with a bag-size term, folded into
        the weights and `size_slope`)."""
        layers = self.slide_layers()
        for layer in layers:
            layer.weight.mul_(a)
            layer.bias.mul_(a)
        layers[0].bias.add_(b)
        self.config.size_slope = float(a * self.config.size_slope + c)


class MILEnsemble(nn.Module):
    """`config.members` AttentionMIL slide heads of one pool over one shared cell head: the slide logit is the
    mean of theirs (plus the size term), the attention the mean of their weights. The same interface as
    AttentionMIL (`config`, `cell_head`, `forward`, `calibrate`)."""

    def __init__(self, config: MILConfig):
        super().__init__()
        if config.members < 2:
            raise ValueError(f"an ensemble needs 2 or more members, got {config.members}")
        self.config = config
        self.cell_head = nn.Linear(config.in_dim, 1)
        one = replace(config, members=1, size_slope=0.0)  # the size term is the ensemble's, added once
        self.members = nn.ModuleList(AttentionMIL(replace(one)) for _ in range(config.members))
        for m in self.members:
            del m.cell_head  # one cell head, the ensemble's: no copies in the state dict to disagree

    @classmethod
    def of(cls, heads: list[AttentionMIL]) -> MILEnsemble:
        """An ensemble of trained single heads: same pool and widths, no size term of their own, and one cell head
        (the pools that read cell logits would otherwise not average what each member computed)."""
        cfg = heads[0].config
        if any(h.config.members != 1 or replace(h.config, size_slope=0.0) != replace(cfg, size_slope=0.0)
               or h.config.size_slope for h in heads):
            raise ValueError("ensemble members must be uncalibrated single heads of one configuration")
        cell = heads[0].cell_head.state_dict()
        if any(not all(torch.equal(v, cell[k]) for k, v in h.cell_head.state_dict().items()) for h in heads):
            raise ValueError("ensemble members must share one cell head")
        ens = cls(replace(cfg, members=len(heads)))
        ens.cell_head.load_state_dict(cell)
        for m, h in zip(ens.members, heads, strict=True):
            m.load_state_dict({k: v for k, v in h.state_dict().items() if not k.startswith("cell_head.")})
        return ens

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        feats, mask = _batched(feats, mask)
        cell_logits = self.cell_head(feats).squeeze(-1)
        outs = [m.slide_logit(feats, mask, cell_logits) for m in self.members]
        slide = torch.stack([o[0] for o in outs]).mean(0)
        attention = torch.stack([o[1] for o in outs]).mean(0)
        if self.config.size_slope:
            slide = slide + self.config.size_slope * log_cells(cell_logits, mask)
        return MILOutput(slide, attention, cell_logits)

    @torch.no_grad()
    def calibrate(self, a: float, b: float, c: float = 0.0) -> None:
        """As AttentionMIL.calibrate, on the mean: every member's logit becomes a * logit + b, so their mean does."""
        for m in self.members:
            m.calibrate(a, b)
        self.config.size_slope = float(a * self.config.size_slope + c)


def make_mil(config: MILConfig) -> AttentionMIL | MILEnsemble:
    """The slide head a config describes: one AttentionMIL, or an ensemble when `members` > 1."""
    return MILEnsemble(config) if config.members > 1 else AttentionMIL(config)


def single_head_state(mil: AttentionMIL | MILEnsemble) -> dict:
    """A state dict that fits one AttentionMIL of the same config: the head's own, or an ensemble's first member
    with the shared cell head (a start for training a new head from a model's current one)."""
    if isinstance(mil, MILEnsemble):
        return {**{f"cell_head.{k}": v for k, v in mil.cell_head.state_dict().items()},
                **mil.members[0].state_dict()}
    return mil.state_dict()


def _batched(feats: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One bag (N, F) as a batch of one; features as float32."""
    if feats.dim() == 2:
        feats = feats.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    return feats.float(), mask


def log_cells(cell_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N) logits -> (B,): log(real cells), 0 for a bag without any."""
    n = torch.full(cell_logits.shape[:1], cell_logits.shape[-1], device=cell_logits.device) if mask is None \
        else mask.sum(-1)
    return torch.log(n.float().clamp_min(1.0))


def count_stats(cell_logits: torch.Tensor, mask: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """(B, N) logits -> (B, 2): log(1 + real cells with logit >= threshold) and log(real cells), 0 for none."""
    real = torch.ones_like(cell_logits, dtype=torch.bool) if mask is None else mask
    hits = ((cell_logits.float() >= threshold) & real).sum(-1).float()
    return torch.stack([torch.log1p(hits), log_cells(cell_logits, mask)], dim=-1)


def topk_mean(cell_logits: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, N) logits -> (B,): the mean of each bag's k highest real cells (all of them when it has fewer)."""
    x = cell_logits if mask is None else cell_logits.masked_fill(~mask, float("-inf"))
    k = min(int(k), x.shape[-1])
    top = x.topk(k, dim=-1).values  # (B, k)
    real = torch.isfinite(top)
    return torch.where(real, top, 0.0).sum(-1) / real.sum(-1).clamp_min(1)
