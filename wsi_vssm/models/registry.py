"""Named VSSM configs and `create_model`. `tiny`/`small`/`base` and the `_s1` variants have upstream's parameter
names and shapes (their release checkpoints load strictly); `micro` and `micro_wide` are ours (CPU tests, the
default model, and its wider candidate)."""

from __future__ import annotations

import dataclasses

from wsi_vssm.models.vssm import VSSM, ModelConfigError, VSSMConfig

# name -> VSSMConfig fields. Upstream release checkpoint names are in docs/models.md.
MODEL_CONFIGS: dict[str, dict] = {
    # micro: the smallest width that still gives dt_rank 2 in stage 1 and a 256-wide stage-4 map; ~1.8M
    # parameters, so CPU tests run in seconds and a 10,000 px region fits in CPU memory with streaming.
    # Features only (num_classes 0): the cell and MIL heads live elsewhere.
    "micro": dict(dims=32, depths=(1, 1, 2, 1), ssm_ratio=2.0, drop_path=0.0, num_classes=0),
    # micro_wide: micro at 1.5x the width (~4M parameters); the wider candidate that bench/capacity.py trains
    # against micro at equal wall time.
    "micro_wide": dict(dims=48, depths=(1, 1, 2, 1), ssm_ratio=2.0, drop_path=0.0, num_classes=0),
    "tiny": dict(dims=96, depths=(2, 2, 5, 2), ssm_ratio=2.0, drop_path=0.2),
    "small": dict(dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path=0.3),
    "base": dict(dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path=0.6),
    "tiny_s1": dict(dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path=0.2),
    "small_s1": dict(dims=96, depths=(2, 2, 20, 2), ssm_ratio=1.0, drop_path=0.3),
    "base_s1": dict(dims=128, depths=(2, 2, 20, 2), ssm_ratio=1.0, drop_path=0.5),
}

# upstream release checkpoint file for each upstream config (users download these themselves)
UPSTREAM_CHECKPOINTS: dict[str, str] = {
    "tiny": "vssm_tiny_0230_ckpt_epoch_262.pth",
    "small": "vssm_small_0229_ckpt_epoch_222.pth",
    "base": "vssm_base_0229_ckpt_epoch_237.pth",
    "tiny_s1": "vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "small_s1": "vssm1_small_0229s_ckpt_epoch_240.pth",
    "base_s1": "vssm1_base_0229s_ckpt_epoch_225.pth",
}


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


def get_config(name: str, **overrides) -> VSSMConfig:
    """The named config with `overrides` applied (any VSSMConfig field)."""
    if name not in MODEL_CONFIGS:
        raise ModelConfigError(f"unknown model {name!r}; available: {', '.join(MODEL_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(VSSMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelConfigError(
            f"unknown VSSMConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    return VSSMConfig(**{**MODEL_CONFIGS[name], **overrides})


def create_model(name: str, **overrides) -> VSSM:
    """Build the named VSSM, e.g. `create_model("tiny", num_classes=2, scan="cpu")`.

    Weights are freshly initialised; use `load_checkpoint(model, path)` for released weights. Build under
    `with torch.device("meta"):` to inspect shapes without allocating.
    """
    return VSSM(get_config(name, **overrides))
