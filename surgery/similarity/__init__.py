"""Comparing variants: representation similarity (CKA, SVCCA, PWCCA), agreement, intervals.

- :mod:`~surgery.similarity.cka`: linear CKA and the streaming minibatch (debiased) CKA;
- :mod:`~surgery.similarity.cca`: SVCCA and PWCCA;
- :mod:`~surgery.similarity.representations`: layer activations over a dataset and the
  layer x layer similarity matrix between two models;
- :mod:`~surgery.similarity.agreement`: per-image agreement of predictions and attribution maps;
- :mod:`~surgery.similarity.stats`: intervals over images: percentile bootstrap for means,
  delete-a-group jackknife for everything fitted (CKA, CCA, contrasts).

Example:
    >>> from surgery.similarity import layer_similarity, mean_ci, prediction_agreement
    >>> sim = layer_similarity(fp32, int8, loader, ["layer1", "layer2", "layer3", "layer4"])
    >>> mean_ci(prediction_agreement(fp32(x), int8(x)))
"""

from surgery.similarity.agreement import (map_spearman, output_divergence, prediction_agreement, top_pixels, topk_iou,
                                          topk_overlap)
from surgery.similarity.cca import MomentAccumulator, canonical_correlations, pwcca, svcca
from surgery.similarity.cka import MinibatchCKA, cka
from surgery.similarity.representations import (CCAStream, LayerSimilarity, iter_activations, layer_similarity,
                                                matched_positions, reduce_activation, streamed_cka)
from surgery.similarity.stats import Estimate, Jackknife, bootstrap, group_of, grouped_mean, jackknife, mean_ci

__all__ = [
    "CCAStream", "Estimate", "Jackknife", "LayerSimilarity", "MinibatchCKA", "MomentAccumulator", "bootstrap",
    "canonical_correlations", "cka", "group_of", "grouped_mean", "iter_activations", "jackknife",
    "layer_similarity", "map_spearman", "matched_positions", "mean_ci", "output_divergence",
    "prediction_agreement", "pwcca", "reduce_activation", "streamed_cka", "svcca", "top_pixels", "topk_iou",
    "topk_overlap",
]
