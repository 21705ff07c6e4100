"""surgery: look inside FP32, INT8 and sparse CNNs with the same tools.

Example:
    >>> import surgery
    >>> model, config = surgery.load_variant("zoo/resnet18-shapes/int8")
    >>> maps = surgery.gradcam(model, images)
"""

# The model zoo: architectures, registry, checkpoint format, loader.
from surgery.architectures import Architecture, architecture_of
from surgery.checkpoint import CheckpointError, Variant, read_config, save_variant
from surgery.loading import load_variant
from surgery.registry import FAMILIES, ModelFamily, build_model, get_family

# Attribution and activation maximization.
from surgery.actmax import ActMaxResult, activation_maximization
from surgery.attribution import Explanation, explain, gradcam, normalize_maps, saliency

# Comparison of variants and scoring of maps against ground truth.
from surgery.scoring import DeletionInsertion, deletion_insertion, energy_in_mask, pointing_game
from surgery.similarity import (Estimate, LayerSimilarity, MinibatchCKA, canonical_correlations, cka,
                                layer_similarity, map_spearman, mean_ci, prediction_agreement, pwcca, svcca,
                                topk_iou, topk_overlap)

__all__ = [
    "FAMILIES", "Architecture", "CheckpointError", "ModelFamily", "Variant",
    "architecture_of", "build_model", "get_family", "load_variant", "read_config", "save_variant",
    "ActMaxResult", "Explanation", "activation_maximization", "explain", "gradcam", "normalize_maps", "saliency",
    "DeletionInsertion", "deletion_insertion", "energy_in_mask", "pointing_game",
    "Estimate", "LayerSimilarity", "MinibatchCKA", "canonical_correlations", "cka", "layer_similarity",
    "map_spearman", "mean_ci", "prediction_agreement", "pwcca", "svcca", "topk_iou", "topk_overlap",
]
