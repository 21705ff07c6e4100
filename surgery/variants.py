"""What a zoo member is, read from its name: one grammar for every tool that lists variants.

A *variant name* is the directory name in a zoo and the suffix of its Hub repo
(``ORG/<family>-<name>``):

=================  ==========================================================================
``fp32``           the FP32 model (seed 0)
``int8`` ...       quantized: weights and activations at *b* bits (``int8``, ``int4``, ``int3``, ``int2``)
``w4a8``           quantized: weights at 4 bits, activations at 8 (any ``w<b>a<b>``)
``sparse90`` ...   magnitude sparsity: that percentage of conv and linear weights are zero
``w4a8-dw8`` ...   quantized, with the depthwise convolutions (weights and inputs) kept at 8 bits
``sparse90-dwdense``  sparse, with the depthwise convolutions left dense (the rest sparser, so
                   that the percentage still holds over all conv and linear weights)
``int8-ptq`` ...   quantized post-training only: the recipe's calibration and corrections, none of
                   its fine-tuning (QAT or distillation); after a depthwise suffix (``w4a8-dw8-ptq``)
``<any>-seed<k>``  the same, trained (or derived from the FP32 model trained) with seed *k*:
                   ``fp32-seed1`` is the seed control of ``fp32``
``fp32-recipe<k>``  an FP32 model from an independent training run with another recipe: for a
                   pretrained family, which has no seeds, torchvision's other weights
                   (``mobilenetv2-imagenet``: ``IMAGENET1K_V2``)
=================  ==========================================================================

The first convolution and the classifier of a quantized variant stay at 8 bits whatever *b*
(as in LSQ, Esser et al. 2020); its checkpoint records the bit width of every quantizer. The
depthwise suffixes name the one layer kind a network may keep at higher precision or density
(a depthwise 3x3 kernel has 9 weights a channel: MobileNets lose most there, Nagel et al. 2019);
the plain variant is the same rung with every layer compressed. A post-training variant is the
fine-tuned one's starting point: it takes seconds where the fine-tuning takes minutes, and set beside
it, shows what the fine-tuning changed.

Example:
    >>> spec = parse_variant("w4a8")
    >>> spec.kind, spec.weight_bits, spec.activation_bits
    ('quantized', 4, 8)
    >>> sorted(["sparse90", "int4", "fp32-seed1", "fp32", "int8"], key=sort_key)
    ['fp32', 'int8', 'int4', 'sparse90', 'fp32-seed1']
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("fp32", "quantized", "sparse")
MIN_BITS, MAX_BITS = 2, 8
# The zoo a family gets by default, the whole compression ladder, and the Space's default columns.
DEFAULT_ZOO = ("fp32", "int8", "sparse90")
LADDER = ("int8", "w4a8", "int4", "int3", "int2", "sparse50", "sparse75", "sparse90", "sparse95", "sparse98")
DEFAULT_COLUMNS = ("fp32", "int8", "int4", "sparse90")

_PATTERN = re.compile(r"^(?:(?P<fp32>fp32)|int(?P<bits>\d)|w(?P<wbits>\d)a(?P<abits>\d)|sparse(?P<percent>\d{1,2}))"
                      r"(?:-(?P<depthwise>dw8|dwdense))?(?P<ptq>-ptq)?(?:-seed(?P<seed>\d+))?$")
# The depthwise suffix each kind takes: quantized variants keep depthwise convolutions at 8 bits,
# sparse ones keep them dense.
DEPTHWISE_SUFFIX = {"quantized": "dw8", "sparse": "dwdense"}
_RECIPE = re.compile(r"^fp32-recipe(?P<recipe>[1-9]\d*)$")


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant name (see the module docstring)."""

    name: str
    kind: str  # one of KINDS
    seed: int = 0
    weight_bits: int | None = None
    activation_bits: int | None = None
    sparsity: float | None = None  # the target fraction of zero weights
    keep_depthwise: bool = False  # depthwise convolutions at 8 bits (quantized) or dense (sparse)
    recipe: int = 0  # k of fp32-recipe<k>: another training run than the family's own
    post_training: bool = False  # quantized by calibration and corrections alone, not fine-tuned

    @property
    def base(self) -> str:
        """The name without its seed suffix: the rung of the ladder (``int4-seed1`` -> ``int4``)."""
        return self.name.split("-seed")[0]

    @property
    def is_seed_control(self) -> bool:
        """An FP32 model trained with a seed other than 0: the null of retraining noise."""
        return self.kind == "fp32" and self.seed != 0

    @property
    def is_recipe_control(self) -> bool:
        """An FP32 model of another training run with another recipe (not another seed)."""
        return self.recipe != 0

    @property
    def is_control(self) -> bool:
        """Another FP32 training run (a seed or a recipe control): what "differs" is measured against."""
        return self.is_seed_control or self.is_recipe_control

    @property
    def title(self) -> str:
        """How a page names it: ``FP32``, ``INT4 (W4A4)``, ``W4A8``, ``95% sparse``, ``FP32, seed 1``,
        ``FP32, another recipe``, ``INT8 (W8A8), post-training``."""
        if self.recipe:
            return "FP32, another recipe" + (f" ({self.recipe})" if self.recipe > 1 else "")
        if self.kind == "fp32":
            text = "FP32"
        elif self.kind == "quantized":
            text = (f"INT{self.weight_bits} (W{self.weight_bits}A{self.activation_bits})"
                    if self.weight_bits == self.activation_bits else f"W{self.weight_bits}A{self.activation_bits}")
        else:
            text = f"{self.sparsity * 100:g}% sparse"
        if self.keep_depthwise:
            text += ", depthwise 8-bit" if self.kind == "quantized" else ", depthwise dense"
        if self.post_training:
            text += ", post-training"
        return f"{text}, seed {self.seed}" if self.seed else text

    @property
    def order(self) -> tuple:
        """FP32, then quantized from most to fewest bits (each fine-tuned before post-training), then
        sparse from least to most, then seeds."""
        rank = KINDS.index(self.kind)
        level = ((-(self.weight_bits or 0), -(self.activation_bits or 0)) if self.kind == "quantized"
                 else (self.sparsity or 0.0, 0))
        return (self.seed, self.recipe, rank, *level, self.keep_depthwise, self.post_training)


def parse_variant(name: str) -> VariantSpec:
    """Parse a variant name; ``ValueError`` with the grammar for anything else."""
    recipe = _RECIPE.match(str(name))
    if recipe is not None:
        return VariantSpec(name, "fp32", recipe=int(recipe["recipe"]))
    match = _PATTERN.match(str(name))
    if match is None:
        raise ValueError(f"not a variant name: {name!r}; expected fp32, int<b>, w<b>a<b> (b in {MIN_BITS}..{MAX_BITS}) "
                         "or sparse<percent>, optionally followed by -dw8 (quantized) or -dwdense (sparse), "
                         "then -ptq (quantized), then -seed<k>; or fp32-recipe<k>")
    seed = int(match["seed"] or 0)
    kind = "fp32" if match["fp32"] else ("sparse" if match["percent"] else "quantized")
    keep = match["depthwise"] is not None
    if keep and match["depthwise"] != DEPTHWISE_SUFFIX.get(kind):
        raise ValueError(f"{name!r}: -{match['depthwise']} does not apply to a {kind} variant"
                         + (f"; use -{DEPTHWISE_SUFFIX[kind]}" if kind in DEPTHWISE_SUFFIX else ""))
    if match["ptq"] and kind != "quantized":
        raise ValueError(f"{name!r}: -ptq (post-training quantization only) applies to quantized variants")
    if kind == "fp32":
        return VariantSpec(name, "fp32", seed)
    if kind == "sparse":
        percent = int(match["percent"])
        if not 0 < percent < 100:
            raise ValueError(f"{name!r}: sparsity must be between 1 and 99 percent")
        return VariantSpec(name, "sparse", seed, sparsity=percent / 100, keep_depthwise=keep)
    weight_bits = int(match["bits"] or match["wbits"])
    activation_bits = int(match["bits"] or match["abits"])
    for bits in (weight_bits, activation_bits):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"{name!r}: bit widths must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    if keep and weight_bits == activation_bits == MAX_BITS:
        raise ValueError(f"{name!r}: every layer is at 8 bits already; -dw8 needs fewer bits")
    return VariantSpec(name, "quantized", seed, weight_bits=weight_bits, activation_bits=activation_bits,
                       keep_depthwise=keep, post_training=bool(match["ptq"]))


def quantized_name(weight_bits: int, activation_bits: int | None = None, seed: int = 0) -> str:
    """``int4`` for W4A4, ``w4a8`` otherwise (inverse of :func:`parse_variant`)."""
    activation_bits = weight_bits if activation_bits is None else activation_bits
    name = f"int{weight_bits}" if weight_bits == activation_bits else f"w{weight_bits}a{activation_bits}"
    return parse_variant(_seeded(name, seed)).name


def sparse_name(sparsity: float, seed: int = 0) -> str:
    """``sparse95`` for 0.95 (inverse of :func:`parse_variant`)."""
    percent = round(sparsity * 100)
    if abs(percent - sparsity * 100) > 1e-6:
        raise ValueError(f"sparsity {sparsity} is not a whole percentage")
    return parse_variant(_seeded(f"sparse{percent}", seed)).name


def seed_name(name: str, seed: int) -> str:
    """The same rung with another seed: ``seed_name("fp32", 2) == "fp32-seed2"``."""
    return parse_variant(_seeded(parse_variant(name).base, seed)).name


def _seeded(name: str, seed: int) -> str:
    return f"{name}-seed{seed}" if seed else name


def sort_key(name: str) -> tuple:
    """Display order of variant names (see :attr:`VariantSpec.order`)."""
    return parse_variant(name).order


def sort_variants(names: Iterable[str]) -> list[str]:
    return sorted(names, key=sort_key)
