"""The compression ladder: real bit widths, real zeros, exact reloads, the legacy INT8 kind, tampering.

Runs on ``untrained_zoo`` (conftest): every rung of ``surgery.variants.LADDER`` built by the real CLI
after two training steps per stage, so the formats, bit widths and sparsity levels are real while
the accuracy is not. The reload test compares with the models as the training code saved them
(``saved_outputs``, recorded during that build): nothing is trained again.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from surgery import CheckpointError, compression, load_variant, read_config
from surgery.checkpoint import CONFIG_FILE, WEIGHTS_FILE, sha256_file
from surgery.data import ShapesDataset, ShapesSpec, build_dataset
from surgery.registry import get_family
from surgery.variants import LADDER, parse_variant
from training.loop import accuracy_metrics, predict

QUANTIZED = [v for v in LADDER if parse_variant(v).kind == "quantized"]
SPARSE = [v for v in LADDER if parse_variant(v).kind == "sparse"]


def _images(n: int = 16) -> torch.Tensor:
    return ShapesDataset(ShapesSpec("val", n)).images.float() / 255


def _quantizer_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """What every quantizer hands on during one forward pass (a shared quantizer runs twice), cloned
    at once: the block's in-place residual add and ReLU overwrite the tensors afterwards."""
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [q.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o.detach().clone()))
               for name, q in compression.named_quantizers(model).items()]
    try:
        with torch.no_grad(), compression.forward_lock(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


class _Traced(dict):
    """A quantized rung's config, its quantizers' outputs on a batch, and the model; loaded once."""

    def __init__(self, zoo: Path):
        super().__init__()
        self.zoo = zoo

    def __missing__(self, name: str) -> tuple[dict, dict[str, list[torch.Tensor]], nn.Module]:
        model, config = load_variant(self.zoo / name)
        self[name] = (config, _quantizer_outputs(model, _images()), model)
        return self[name]


@pytest.fixture(scope="module")
def traced(untrained_zoo) -> _Traced:
    return _Traced(untrained_zoo)


@pytest.mark.parametrize("variant", QUANTIZED)
def test_weights_take_at_most_2_to_the_b_values_per_output_channel(traced, variant):
    config, outputs, model = traced[variant]
    spec = parse_variant(variant)
    record = config["compression"]["quantizers"]
    weights = {r["layer"]: name for name, r in record.items() if r["role"] == "weight"}
    layers = set(compression.weight_layers(model))
    assert set(weights) == layers, "every convolution and the classifier have their weights quantized"
    for layer, name in weights.items():
        bits = 8 if layer in ("conv1", "fc") else spec.weight_bits
        assert record[name]["bits"] == bits and record[name]["first_or_last"] == (layer in ("conv1", "fc"))
        fake_quantized = outputs[name][0]  # what the layer computed with
        per_channel = [len(torch.unique(w)) for w in fake_quantized.flatten(1)]
        assert max(per_channel) <= 2 ** bits, f"{layer}: {max(per_channel)} values at {bits} bits"
        assert not torch.equal(fake_quantized, dict(model.named_modules())[layer].weight), "quantizer ran"
    if spec.weight_bits < 8:  # the classifier really is finer than the rest
        fc = outputs[weights["fc"]][0]
        assert max(len(torch.unique(w)) for w in fc) > 2 ** spec.weight_bits


@pytest.mark.parametrize("variant", QUANTIZED)
def test_activations_take_at_most_2_to_the_b_levels(traced, variant):
    config, outputs, _ = traced[variant]
    spec = parse_variant(variant)
    record = config["compression"]["quantizers"]
    activations = {name: r for name, r in record.items() if r["role"] == "activation"}
    assert len(activations) >= 10
    fed_by_edge = {r["layer"] for r in activations.values() if r["first_or_last"]}
    assert "conv1" in fed_by_edge and fed_by_edge <= {"conv1", "fc"}
    if spec.activation_bits < 8:  # NNCF's 8-bit CPU preset quantizes the pooling's input instead of fc's
        assert fed_by_edge == {"conv1", "fc"}, "the inputs of the first conv and the classifier are quantized"
    for name, r in activations.items():
        bits = 8 if r["first_or_last"] else spec.activation_bits
        assert r["bits"] == bits
        levels = len(torch.unique(torch.cat([o.flatten() for o in outputs[name]])))
        assert levels <= 2 ** bits, f"{name}: {levels} levels at {bits} bits"
    if spec.activation_bits < 8:  # the network input keeps its 8-bit resolution
        image_input = next(n for n, r in activations.items() if r["layer"] == "conv1")
        assert len(torch.unique(outputs[image_input][0])) > 2 ** spec.activation_bits


@pytest.mark.parametrize("variant", SPARSE)
def test_sparse_file_stores_its_target_fraction_of_zeros(untrained_zoo, variant):
    target = parse_variant(variant).sparsity
    zeros = total = 0
    with safetensors.safe_open(str(untrained_zoo / variant / WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            t = f.get_tensor(key)
            if key.endswith("weight") and t.dim() in (2, 4):  # conv kernels and the fc matrix
                zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    assert zeros >= math.floor(target * total)  # the target, rounded down to whole weights
    assert not any("nncf" in k for k in keys), "masks are baked into the weights, not stored beside them"
    comp = read_config(untrained_zoo / variant)["compression"]
    assert comp["target_sparsity"] == target and comp["achieved_sparsity"] == pytest.approx(zeros / total, abs=1e-12)


@pytest.mark.parametrize("variant", ["fp32", *LADDER, "fp32-seed1"])
def test_reload_gives_the_model_that_training_saved(untrained_zoo, saved_outputs, probe_images, variant):
    """Reloaded, each variant computes what the training code's own model computed when it was saved
    (max abs difference <= 1e-6), with the same bit widths and levels, and predicts the held-out set
    exactly as the metrics saved with it say."""
    directory = untrained_zoo / variant
    model, config = load_variant(directory)
    saved = saved_outputs[variant]
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert config["variant"] == variant and not model.training
    with torch.no_grad(), compression.forward_lock(model):
        assert (model(probe_images) - saved["logits"]).abs().max().item() <= 1e-6
    widths = compression.bit_widths(model)
    assert widths == saved["bit_widths"]
    levels = {n: q.levels for n, q in compression.named_quantizers(model).items()}
    assert levels == saved["levels"] and all(levels[n] <= 2 ** b for n, b in widths.items())
    if config["kind"] == "quantized":
        assert widths == {n: r["bits"] for n, r in config["compression"]["quantizers"].items()}

    family = get_family("resnet18-shapes")
    eval_set = build_dataset(family, "eval", None, samples=config["metrics"]["eval_samples"])
    logits, labels = predict(model, eval_set, torch.device("cpu"))
    reference = None
    if "agreement_with_fp32" in config["metrics"]:
        fp32, _ = load_variant(untrained_zoo / "fp32")
        reference = predict(fp32, eval_set, torch.device("cpu"))[0]
    fresh = accuracy_metrics(logits, labels, family.class_names, reference)
    for key in ("top1", "top5", "agreement_with_fp32", "top5_overlap_with_fp32"):
        if key in config["metrics"]:
            assert fresh[key] == config["metrics"][key], key
    if reference is not None:
        assert fresh["kl_from_fp32"] == pytest.approx(config["metrics"]["kl_from_fp32"], rel=1e-4, abs=1e-7)


# --- the former kind "int8" ------------------------------------------------------------------------

def make_legacy_int8(new_int8: Path, out: Path) -> Path:
    """A checkpoint as main wrote INT8 before the ladder: kind ``int8``, no per-quantizer widths.
    The weights file is unchanged: NNCF's 8-bit CPU preset shares no quantizer, so main's state dict
    and today's hold the same tensors."""
    out = Path(shutil.copytree(new_int8, out))
    config = json.loads((out / CONFIG_FILE).read_text())
    comp = config["compression"]
    config["kind"] = "int8"
    config["compression"] = {"method": comp["method"], "bits": 8, "calibration_samples": comp["calibration_samples"],
                             "quantizers": len(comp["quantizers"]), "qat_epochs": 1}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def test_legacy_int8_checkpoint_loads_as_8_bit_quantized(untrained_zoo, tmp_path):
    legacy = make_legacy_int8(untrained_zoo / "int8", tmp_path / "int8")
    model, config = load_variant(legacy)
    assert config["kind"] == "quantized" and config["variant"] == "int8"
    assert config["compression"]["legacy_kind"] == "int8"
    assert (config["compression"]["weight_bits"], config["compression"]["activation_bits"]) == (8, 8)
    widths = compression.bit_widths(model)
    assert len(widths) > 20 and set(widths.values()) == {8}
    current, _ = load_variant(untrained_zoo / "int8")
    x = _images(4)
    with torch.no_grad():
        assert (model(x) - current(x)).abs().max().item() <= 1e-6


# --- tampering -------------------------------------------------------------------------------------

@pytest.fixture
def int4_copy(untrained_zoo, tmp_path) -> Path:
    return Path(shutil.copytree(untrained_zoo / "int4", tmp_path / "int4"))


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    edit(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def edit_weights(directory: Path, edit) -> None:
    """Rewrite the weights file and fix the hash the config records, as a careful forger would."""
    path = directory / WEIGHTS_FILE
    with safetensors.safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors, metadata = edit(tensors, metadata)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    edit_config(directory, lambda c: c["weights"].update(sha256=sha256_file(path)))


def _a_4_bit_weight_quantizer(directory: Path) -> str:
    record = read_config(directory)["compression"]["quantizers"]
    return next(n for n, r in record.items() if r["role"] == "weight" and r["bits"] == 4)


def test_refuses_recorded_bit_width_that_the_model_does_not_have(int4_copy):
    name = _a_4_bit_weight_quantizer(int4_copy)
    edit_config(int4_copy, lambda c: c["compression"]["quantizers"][name].update(bits=8))
    with pytest.raises(CheckpointError, match=r"config\.json: recorded bit widths disagree.*recorded 8, restored 4"):
        load_variant(int4_copy)


def test_refuses_variant_widths_that_disagree_with_the_quantizers(int4_copy):
    edit_config(int4_copy, lambda c: c["compression"].update(weight_bits=8))
    with pytest.raises(CheckpointError, match="the variant's widths say 8"):
        load_variant(int4_copy)


def test_refuses_weights_whose_bit_widths_disagree_with_nncf_config(int4_copy):
    name = _a_4_bit_weight_quantizer(int4_copy)

    def to_8_bits(tensors, metadata):
        tensors[f"__nncf_hooks.{name}._num_bits"] = torch.tensor([8], dtype=torch.int32)
        return tensors, metadata

    edit_weights(int4_copy, to_8_bits)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: quantizer .*8 bits in the weights, 4 in NNCF"):
        load_variant(int4_copy)


def test_refuses_consistent_weights_and_nncf_config_against_the_recorded_widths(int4_copy):
    """Widths changed in both the weights and NNCF's config still disagree with config.json."""
    name = _a_4_bit_weight_quantizer(int4_copy)

    def to_8_bits(tensors, metadata):
        tensors[f"__nncf_hooks.{name}._num_bits"] = torch.tensor([8], dtype=torch.int32)
        nncf_config = json.loads(metadata["nncf_config"])
        for entry in nncf_config["compression_state"]:
            if name in entry["hook_names_in_model"]:
                entry["module_config"]["num_bits"] = 8
        return tensors, {**metadata, "nncf_config": json.dumps(nncf_config)}

    edit_weights(int4_copy, to_8_bits)
    with pytest.raises(CheckpointError, match="recorded bit widths disagree"):
        load_variant(int4_copy)


def test_refuses_recorded_sparsity_that_the_weights_do_not_have(untrained_zoo, tmp_path):
    d = Path(shutil.copytree(untrained_zoo / "sparse98", tmp_path / "sparse98"))
    edit_config(d, lambda c: c["compression"].update(achieved_sparsity=0.99))
    with pytest.raises(CheckpointError, match="records 0.99 sparsity"):
        load_variant(d)
