"""Models: the VSSM (VMamba v2) backbone, its SS2D mixer, named configs and checkpoint loading.

    from wsi_vssm.models import create_model, load_checkpoint
    model = load_checkpoint(create_model("tiny"), "vssm_tiny_0230_ckpt_epoch_262.pth").eval()
"""

from wsi_vssm.models.checkpoint import CheckpointError, CheckpointMismatchError, load_checkpoint
from wsi_vssm.models.registry import MODEL_CONFIGS, UPSTREAM_CHECKPOINTS, create_model, get_config, list_models
from wsi_vssm.models.ss2d import SS2D
from wsi_vssm.models.vssm import VSSM, ModelConfigError, VSSMConfig

__all__ = [
    "VSSM", "VSSMConfig", "SS2D", "ModelConfigError", "create_model", "get_config", "list_models",
    "MODEL_CONFIGS", "UPSTREAM_CHECKPOINTS", "load_checkpoint", "CheckpointError", "CheckpointMismatchError",
]
