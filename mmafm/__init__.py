"""mmafm: an open PyTorch re-creation of the multimodal foundation-model stack of Apple's 2024
and 2025 foundation-model reports. See README.md and ../shared/REFERENCE.md."""

from mmafm.registry import create_model, get_config, list_models, register_model

__version__ = "0.1.0"

__all__ = ["create_model", "get_config", "list_models", "register_model", "__version__"]
