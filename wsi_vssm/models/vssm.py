"""The VSSM (VMamba v2) backbone, channel-first: stem to stride 4, four stages of VSS blocks with stride-2
downsampling between them, and an optional classifier. Parameter names and shapes are upstream's, so release
checkpoints load strictly (see `wsi_vssm.models.checkpoint` and docs/models.md).

File order: config, blocks, model. Named configs live in `registry.py`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from wsi_vssm.errors import UsageError
from wsi_vssm.models.layers import DropPath, LayerNorm2d, Linear2d, autocast_off, row_bands
from wsi_vssm.models.ss2d import (
    DEFAULT_STREAM_CHUNK,
    DEFAULT_STREAM_CHUNK_CUDA,
    DEFAULT_STREAM_MIN_PIXELS,
    SS2D,
    resolve_dt_rank,
)
from wsi_vssm.ops.scan import IMPLS
from wsi_vssm.ops.ss2d_fused import SS2D_IMPLS
from wsi_vssm.ops.stem import stem_head_fused, use_fused_stem

NUM_STAGES = 4


class ModelConfigError(UsageError, ValueError):
    """A model configuration that cannot be built (bad value, unknown name or scan implementation)."""


@dataclass
class VSSMConfig:
    """Everything needed to build a VSSM. `dims` is C (stage widths C, 2C, 4C, 8C) or the four widths."""

    dims: int | tuple[int, int, int, int] = 96
    depths: tuple[int, int, int, int] = (2, 2, 5, 2)
    ssm_ratio: float = 2.0  # D = ssm_ratio * C inner channels of SS2D
    d_state: int = 1
    dt_rank: int | str = "auto"  # 'auto' = ceil(C / 16) per stage
    mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth, rising linearly over the blocks to this rate
    num_classes: int = 1000  # 0: no classifier parameters; forward returns pooled features
    in_chans: int = 3
    scan: str = "auto"  # selective_scan implementation, one of wsi_vssm.ops.scan.IMPLS
    # SS2D implementation, one of wsi_vssm.ops.ss2d_fused.SS2D_IMPLS: 'auto' = the fused channels-last CPU kernel
    # for CPU tensors when scan is 'auto' or 'cpu', else today's channel-first path ('reference')
    ss2d_impl: str = "auto"
    grad_checkpoint: bool = False  # recompute each stage's blocks in backward (torch.utils.checkpoint)
    stream_min_pixels: int | None = DEFAULT_STREAM_MIN_PIXELS  # no-grad maps this large stream; None = never
    stream_chunk: int = DEFAULT_STREAM_CHUNK  # sequence positions per streaming chunk on CPU
    stream_chunk_cuda: int = DEFAULT_STREAM_CHUNK_CUDA  # ... and on a GPU (fewer kernel launches)

    def __post_init__(self):
        self.dims = _stage_dims(self.dims)
        if isinstance(self.depths, int) or len(self.depths) != NUM_STAGES:
            raise ModelConfigError(f"depths must be {NUM_STAGES} ints, got {self.depths!r}")
        self.depths = tuple(int(d) for d in self.depths)
        if any(d < 1 for d in self.depths):
            raise ModelConfigError(f"depths must be >= 1, got {self.depths}")
        if self.scan not in IMPLS:
            raise ModelConfigError(f"unknown scan implementation {self.scan!r}; valid: {', '.join(IMPLS)}")
        if self.ss2d_impl not in SS2D_IMPLS:
            raise ModelConfigError(
                f"unknown SS2D implementation {self.ss2d_impl!r}; valid: {', '.join(SS2D_IMPLS)}")
        for name, low in (("ssm_ratio", 0.0), ("mlp_ratio", 0.0)):
            if not getattr(self, name) > low:
                raise ModelConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ModelConfigError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        for name, low in (("d_state", 1), ("num_classes", 0), ("in_chans", 1), ("stream_chunk", 1),
                          ("stream_chunk_cuda", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ModelConfigError(f"{name} must be an int >= {low}, got {value!r}")
        try:
            resolve_dt_rank(self.dt_rank, self.dims[0])
        except ValueError as e:
            raise ModelConfigError(str(e)) from None

    @property
    def num_features(self) -> int:
        """Channels of the last stage (8C): the width of `forward_features` and of pooled features."""
        return self.dims[-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stage_dims(dims) -> tuple[int, int, int, int]:
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = tuple(dims * 2**i for i in range(NUM_STAGES))
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else None
    if dims is None or len(dims) != NUM_STAGES or any(not isinstance(d, int) or d < 2 for d in dims):
        raise ModelConfigError(f"dims must be an int >= 2 or {NUM_STAGES} ints >= 2, got {dims!r}")
    return dims


# ---------------------------------------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    """Per-pixel MLP (C -> hidden -> C) with exact GELU; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """x += SS2D(LN(x)); x += MLP(LN(x)). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, cfg: VSSMConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(
            dim, d_state=cfg.d_state, ssm_ratio=cfg.ssm_ratio, dt_rank=cfg.dt_rank, scan=cfg.scan,
            stream_min_pixels=cfg.stream_min_pixels, stream_chunk=cfg.stream_chunk,
            stream_chunk_cuda=cfg.stream_chunk_cuda, impl=cfg.ss2d_impl,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.op.use_streaming(x.shape[2], x.shape[3]):
            return self._forward_bands(x)
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Inference on a large map: streaming SS2D, then the MLP in row bands added in place (same result)."""
        y = self.op.forward_streaming(self.norm(x))
        y += x  # y is ours: the residual sum without another full map
        for r0, r1 in row_bands(y.shape[2], y.shape[3], self.op.chunk_for(y)):
            band = y[:, :, r0:r1]
            band += self.mlp(self.norm2(band))
        return y


class Stage(nn.Module):
    """`blocks` at one resolution, then `downsample` (conv 3x3 stride 2 + LN; Identity after the last stage)."""

    def __init__(self, blocks: nn.Sequential, downsample: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample


def _downsample(dim_in: int, dim_out: int) -> nn.Sequential:
    # Identity slots keep upstream's indices (.1 conv, .3 norm) where its permutes sit.
    return nn.Sequential(
        nn.Identity(), nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1), nn.Identity(), LayerNorm2d(dim_out)
    )


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """Stride-4 stem; indices .0 .2 .5 .7 as upstream's "v2" stem."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),  # 0
        nn.Identity(),  # 1
        LayerNorm2d(dim // 2),  # 2
        nn.Identity(),  # 3
        nn.GELU(),  # 4
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),  # 5
        nn.Identity(),  # 6
        LayerNorm2d(dim),  # 7
    )


# ---------------------------------------------------------------------------------------------------- model

def _drop_rates(rate: float, n_blocks: int) -> list[float]:
    """Stochastic-depth rate of each block: rising linearly from 0 to `rate` (VMamba's schedule)."""
    return torch.linspace(0, rate, n_blocks, device="cpu").tolist()


class VSSM(nn.Module):
    """VMamba v2 backbone. Any input size: each stride-2 step maps n to ceil(n / 2)."""

    def __init__(self, config: VSSMConfig | None = None):
        super().__init__()
        cfg = config if config is not None else VSSMConfig()
        self.config = cfg
        dims = cfg.dims
        self.num_features = cfg.num_features
        self.patch_embed = _stem(cfg.in_chans, dims[0])
        rates = _drop_rates(cfg.drop_path, sum(cfg.depths))
        layers, start = [], 0
        for i, depth in enumerate(cfg.depths):
            blocks = nn.Sequential(*(VSSBlock(dims[i], cfg, rates[start + j]) for j in range(depth)))
            down = _downsample(dims[i], dims[i + 1]) if i < NUM_STAGES - 1 else nn.Identity()
            layers.append(Stage(blocks, down))
            start += depth
        self.layers = nn.ModuleList(layers)
        if cfg.num_classes > 0:
            self.classifier = nn.Sequential(
                OrderedDict(norm=LayerNorm2d(self.num_features), head=nn.Linear(self.num_features, cfg.num_classes))
            )
        else:
            self.classifier = None  # features only: no classifier parameters at all
        self.apply(_init_weights)

    def set_drop_path(self, rate: float) -> None:
        """Re-set stochastic depth (e.g. to regularise a fine-tune); it acts only in training mode, so inference
        and the saved weights do not depend on it. The config keeps the rate the model was built with."""
        if not 0.0 <= rate < 1.0:
            raise ModelConfigError(f"drop_path must be in [0, 1), got {rate!r}")
        blocks = [b for stage in self.layers for b in stage.blocks]
        for block, r in zip(blocks, _drop_rates(rate, len(blocks)), strict=True):
            block.drop_path.rate = float(r)

    # stage outputs -----------------------------------------------------------------------------------
    def channels_last(self, x: torch.Tensor) -> bool:
        """Whether this input runs channels-last: when its SS2D blocks take the fused CPU kernel."""
        return self.layers[0].blocks[0].op.use_fused(x)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """patch_embed, in fp32 even under autocast (`autocast_off`); on the channels-last path its first conv,
        norm and GELU run as one fused CPU kernel when `use_fused_stem` allows (inference), reading the NCHW
        input without a layout copy."""
        with autocast_off(x):
            return self._stem_fp32(x.to(self.patch_embed[0].weight.dtype))

    def _stem_fp32(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last(x):
            return self.patch_embed(x)
        conv, norm = self.patch_embed[0], self.patch_embed[2]
        act = self.patch_embed[4]
        if use_fused_stem(x, conv) and isinstance(act, nn.GELU) and act.approximate == "none":
            x = stem_head_fused(x, conv, norm)
            return self.patch_embed[5:](x)
        return self.patch_embed(x.contiguous(memory_format=torch.channels_last))

    def _stages(self, x: torch.Tensor):
        """Yields each stage's block output: (B, C_i, H_i, W_i) at strides 4, 8, 16, 32 (channels-last strides
        on the fused path)."""
        x = self._stem(x)  # (B, C, H/4, W/4)
        for layer in self.layers:
            if self.config.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(layer.blocks, x, use_reentrant=False)
            else:
                x = layer.blocks(x)
            yield x
            x = layer.downsample(x)  # (B, 2C_i, ceil(H_i/2), ceil(W_i/2)); Identity after the last stage

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> four maps: C x H/4, 2C x H/8, 4C x H/16, 8C x H/32 (ceil at each stride-2 step)."""
        return [f.contiguous() for f in self._stages(x)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> last stage map (B, 8C, H/32, W/32), before the classifier norm."""
        # earlier stage maps are dropped as the next is computed; NCHW-contiguous out whatever the path
        return deque(self._stages(x), maxlen=1)[0].contiguous()

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 8C, h, w) -> logits (B, num_classes); with num_classes 0 (or pre_logits) the pooled (B, 8C)."""
        if self.classifier is None:
            return f.mean(dim=(2, 3))
        pooled = self.classifier.norm(f).mean(dim=(2, 3))  # (B, 8C)
        return pooled if pre_logits else self.classifier.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes), or pooled features (B, 8C) when num_classes is 0."""
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """Linear: trunc-normal std 0.02, bias 0; LayerNorm: 1, 0. SS2D's own parameters are set in SS2D."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


__all__ = ["VSSM", "VSSMConfig", "ModelConfigError", "VSSBlock", "Mlp", "NUM_STAGES"]
