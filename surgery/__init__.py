"""surgery: look inside FP32, INT8 and sparse CNNs with the same tools.

Example:
    >>> import surgery
    >>> model, config = surgery.load_variant("zoo/resnet18-shapes/int8")
    >>> family = surgery.get_family(config["family"])
"""

from surgery.checkpoint import CheckpointError, Variant, read_config, save_variant
from surgery.loading import load_variant
from surgery.registry import FAMILIES, ModelFamily, build_model, get_family

__all__ = [
    "FAMILIES", "CheckpointError", "ModelFamily", "Variant",
    "build_model", "get_family", "load_variant", "read_config", "save_variant",
]
