"""Depthwise convolutions in the compression ladder: MobileNetV2's depthwise layers really take the
variant's bit width (or 8 bits with ``-dw8``), and per-layer sparsity really prunes every layer
(or leaves the depthwise ones dense with ``-dwdense``, the rest pruned further)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import compression
from surgery.architectures import MOBILENET_V2
from surgery.variants import parse_variant, sort_variants

SIZE = 32


def _mobilenet() -> nn.Module:
    """A small MobileNetV2 built from its architecture description (which names its 8-bit edges)."""
    return MOBILENET_V2.build(MOBILENET_V2.config(10, SIZE, [0.5] * 3, [0.25] * 3, width_mult=0.25))


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return _mobilenet().eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.rand(16, 3, SIZE, SIZE)]


def _weight_levels(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per conv/linear layer: (its weight quantizer's bit width, the most distinct values any output
    channel's quantized weights take), read from what the quantizer hands the layer."""
    roles = compression.quantizer_roles(model, x[:1])
    named = compression.named_quantizers(model)
    layers = dict(model.named_modules())
    out = {}
    for name, role in roles.items():
        if role.kind == "weight":
            with torch.no_grad():
                quantized = named[name](layers[role.layer].weight)
            out[role.layer] = (int(named[name].num_bits), max(len(torch.unique(w)) for w in quantized.flatten(1)))
    return out


def test_the_grammar_names_what_stays_at_8_bits_or_dense():
    for name, kind, keep, title in (("w4a8-dw8", "quantized", True, "W4A8, depthwise 8-bit"),
                                    ("int4-dw8-seed1", "quantized", True, "INT4 (W4A4), depthwise 8-bit, seed 1"),
                                    ("sparse90-dwdense", "sparse", True, "90% sparse, depthwise dense"),
                                    ("sparse90", "sparse", False, "90% sparse")):
        spec = parse_variant(name)
        assert (spec.kind, spec.keep_depthwise, spec.title) == (kind, keep, title)
    assert parse_variant("int4-dw8-seed1").base == "int4-dw8"
    assert sort_variants(["sparse90-dwdense", "w4a8-dw8", "sparse90", "w4a8", "fp32"]) == \
        ["fp32", "w4a8", "w4a8-dw8", "sparse90", "sparse90-dwdense"]
    for bad, message in (("int8-dw8", "8 bits already"), ("sparse90-dw8", "use -dwdense"),
                         ("w4a8-dwdense", "use -dw8"), ("fp32-dwdense", "does not apply")):
        with pytest.raises(ValueError, match=message):
            parse_variant(bad)


@pytest.mark.parametrize("keep_depthwise", [False, True])
def test_depthwise_weights_take_the_variants_bit_width(mobilenet, batches, keep_depthwise):
    model = compression.quantize(mobilenet, batches, 16, weight_bits=4, activation_bits=8,
                                 keep_depthwise=keep_depthwise)
    levels = _weight_levels(model, batches[0])
    depthwise = set(compression.depthwise_layers(mobilenet))
    layers = set(compression.weight_layers(mobilenet))
    assert len(depthwise) == 17 and set(levels) == layers, "every conv, depthwise ones included, and the classifier"
    first, classifier = "features.0.0", "classifier.1"
    for layer, (bits, most) in levels.items():
        expected = 8 if layer in (first, classifier) or (keep_depthwise and layer in depthwise) else 4
        assert bits == expected and most <= 2 ** bits, (layer, bits, most)
    if not keep_depthwise:  # a 3x3 depthwise kernel at 4 bits really is coarser than at 8
        assert max(most for layer, (_, most) in levels.items() if layer in depthwise) <= 16


def test_depthwise_inputs_stay_at_8_bits_with_dw8(mobilenet, batches):
    model = compression.quantize(mobilenet, batches, 16, weight_bits=4, activation_bits=4, keep_depthwise=True)
    roles = compression.quantizer_roles(model, batches[0][:1])
    widths = compression.bit_widths(model)
    depthwise = set(compression.depthwise_layers(mobilenet))
    inputs = {name: widths[name] for name, r in roles.items() if r.kind == "activation" and r.layer in depthwise}
    assert inputs and set(inputs.values()) == {8}
    others = {widths[name] for name, r in roles.items() if r.kind == "activation" and not r.edge
              and r.layer not in depthwise}
    assert others == {4}


@pytest.mark.parametrize("dense", [False, True])
def test_per_layer_sparsity_prunes_every_layer_alike(mobilenet, dense):
    model = _mobilenet()
    model.load_state_dict(mobilenet.state_dict())
    depthwise = compression.depthwise_layers(model)
    scheduler = compression.start_magnitude_sparsity(model, torch.rand(2, 3, SIZE, SIZE), 0.9, 2, per_layer=True,
                                                      dense=depthwise if dense else ())
    scheduler.step(2)
    compression.bake_sparsity(model)
    sparsity = compression.weight_sparsity(model)
    assert sparsity["overall"] == pytest.approx(0.9, abs=2e-3)
    sizes = {n: m.weight.numel() for n, m in compression.weight_layers(model).items()}
    spared = depthwise if dense else []
    ratio = 0.9 * sum(sizes.values()) / sum(v for n, v in sizes.items() if n not in spared)
    pruned = {k: v for k, v in sparsity.items() if k in sizes and k not in spared}
    assert len(pruned) == len(sizes) - len(spared)
    assert all(abs(v - ratio) < 0.02 for v in pruned.values()), "every pruned layer alike: none emptied, none spared"
    assert all(sparsity[k] == 0 for k in spared)
    if dense:
        assert ratio > 0.92, "the rest pruned further, to hold 90% overall"
    with pytest.raises(ValueError, match="no conv or linear layers named"):
        compression.start_magnitude_sparsity(model, torch.rand(2, 3, SIZE, SIZE), 0.5, 1, dense=["features.99"])
