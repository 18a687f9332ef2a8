"""mmafm: an open PyTorch re-creation of the multimodal foundation-model stack of Apple's 2024
and 2025 foundation-model reports. See README.md and ../shared/REFERENCE.md."""

from mmafm.checkpoint import load_model, save_model
from mmafm.registry import create_model, get_config, list_models, register_model

__version__ = "0.1.0"

__all__ = ["create_model", "get_config", "list_models", "register_model", "load_model", "save_model", "__version__"]


# The vision encoders also register with timm: timm.create_model("mmafm_vitdet_large_patch16_rw").
import mmafm.models.vit  # noqa: E402,F401
import mmafm.models.vitdet  # noqa: E402,F401
