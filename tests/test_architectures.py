"""Every architecture's description, and every consumer of it, on a ResNet and on a MobileNetV2.

The descriptions (:mod:`surgery.architectures`) are checked against the built networks: the names
exist, the first convolution and the classifier are the first and last layers a forward runs,
blocks run once each and in order, torchvision's own state dicts load without renaming a key.
Then each consumer runs on a tiny zoo built through the training CLI, ``mobilenet_zoo``
(mobilenetv2-shapes: no ``layer4``, no ``fc``): compression (the 8-bit edges), attribution,
activation maximisation, similarity, the study, the OpenVINO export, the model card and every tab
of the Space; the quick ones also on ``tiny_zoo`` (resnet18-shapes), whose slower consumers
test_study, test_openvino and test_app_api cover.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from hub_export import openvino as deploy
from hub_export.card import model_card
from space.session import Session
from space.ui import Handlers, build_demo, title
from space.zoo_source import SourceConfig, resolve
from study.__main__ import main as study_main
from surgery import activation_maximization, compression, explain, layer_similarity, load_variant
from surgery.architectures import ARCHITECTURES, architecture_of, build_from_architecture, get_architecture
from surgery.attribution import LayerCapture
from surgery.checkpoint import read_config
from surgery.registry import FAMILIES, get_family

ZOOS = {"resnet18-shapes": "tiny_zoo", "mobilenetv2-shapes": "mobilenet_zoo"}
MOBILENET = "mobilenetv2-shapes"  # the slower consumers run on it alone: test_study, test_openvino and
# test_app_api run them on the ResNets
STUDY = ["--images", "16", "--batch-size", "8", "--groups", "2", "--deletion-images", "2", "--deletion-steps", "2",
         "--match-images", "8", "--exemplars", "1"]
# A small configuration of each architecture (what its descriptions are checked on).
SMALL = {"resnet18": {}, "resnet50": {}, "mobilenet_v2": {"width_mult": 0.5}}


def _config(name: str, **options) -> dict:
    return get_architecture(name).config(7, 64, [0.5] * 3, [0.25] * 3, **{**SMALL[name], **options})


def _forward_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    """The named modules in the order a forward pass runs them (each time it runs one)."""
    ran: list[str] = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return ran


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_description_names_the_networks_own_parts(name):
    arch = get_architecture(name)
    model = build_from_architecture(_config(name)).eval()
    assert architecture_of(model) is arch and model.arch_config["input_size"] == 64
    x = torch.rand(2, 3, 64, 64)
    layers = list(compression.weight_layers(model))
    ran = _forward_order(model, layers, x)
    first, classifier = model.get_submodule(arch.first_conv), model.get_submodule(arch.classifier)
    assert ran[0] == arch.first_conv and isinstance(first, nn.Conv2d) and first.in_channels == 3
    assert ran[-1] == arch.classifier and isinstance(classifier, nn.Linear) and classifier.out_features == 7
    assert _forward_order(model, list(arch.blocks), x) == list(arch.blocks), "each block once, in order"
    assert arch.gradcam_layer == arch.stages[-1]
    sides = []
    for stage in arch.stages:
        with LayerCapture(model, stage) as capture, torch.no_grad():
            model(x)
        assert capture.output.dim() == 4
        sides.append(capture.output.shape[-1])
    assert sides == sorted(sides, reverse=True) and len(set(sides)) == len(sides), f"one stage per resolution: {sides}"
    # torchvision's own network of the same shape: its state dict loads, every key as it is.
    plain = getattr(torchvision.models, name)(num_classes=7, **SMALL[name])
    assert str(model.load_state_dict(plain.state_dict())) == "<All keys matched successfully>"
    assert set(model.state_dict()) == set(plain.state_dict())


def test_checkpoint_architectures_are_recorded_as_before_and_unknown_options_refused():
    # What config.json's "architecture" held before architectures were described apart: unchanged.
    assert get_family("resnet18-shapes").architecture() == {
        "arch": "resnet18", "num_classes": 10, "input_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3,
        "cifar_stem": False, "last_stage_stride": 1}
    assert get_family("resnet18-fashionmnist").architecture()["stem"] == {"kernel": 3, "stride": 2, "maxpool": False}
    assert get_family("mobilenetv2-imagenet").architecture() == {
        "arch": "mobilenet_v2", "num_classes": 1000, "input_size": 224, "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "width_mult": 1.0, "last_stage_stride": 2}
    for family in FAMILIES.values():
        json.dumps(family.architecture())  # recorded as JSON
    legacy = {"arch": "resnet18", "num_classes": 10, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert isinstance(build_from_architecture(legacy).maxpool, nn.MaxPool2d)  # absent options take defaults
    with pytest.raises(ValueError, match="resnet18 has no option width_mult"):
        build_from_architecture({**legacy, "width_mult": 0.5})
    with pytest.raises(ValueError, match="unsupported architecture 'vgg16'"):
        build_from_architecture({**legacy, "arch": "vgg16"})


def test_mobilenet_last_stage_stride_keeps_four_by_four_maps_at_64_pixels():
    model = build_from_architecture(_config("mobilenet_v2", last_stage_stride=1))
    with LayerCapture(model, "features.18") as capture, torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    assert capture.output.shape[1:] == (1280, 4, 4)


def test_a_model_without_a_description_asks_for_the_layer():
    with pytest.raises(ValueError, match="carries no architecture description"):
        explain(torchvision.models.mobilenet_v2(num_classes=3).eval(), torch.rand(1, 3, 32, 32))


# -- every consumer, on both zoos ----------------------------------------------------------------

@pytest.fixture(params=sorted(ZOOS), scope="module")
def zoo(request) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(ZOOS[request.param])


def test_compression_keeps_the_described_first_conv_and_classifier_at_8_bits(zoo):
    family, path = zoo
    int8, config = load_variant(path / "int8")
    arch = architecture_of(int8)
    edges = {q["layer"] for q in config["compression"]["quantizers"].values() if q["first_or_last"]}
    assert edges == {arch.first_conv, arch.classifier}
    assert all(q["bits"] == 8 for q in config["compression"]["quantizers"].values())
    sparse, config = load_variant(path / "sparse90")
    assert config["metrics"]["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_attribution_actmax_and_similarity_use_the_description(zoo):
    family, path = zoo
    fp32, int8 = load_variant(path / "fp32").model, load_variant(path / "int8").model
    arch = architecture_of(int8)
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model in (fp32, int8):
        e = explain(model, x)
        assert e.layer == arch.gradcam_layer and e.gradcam.shape == e.saliency.shape == (8, 64, 64)
    result = activation_maximization(int8, arch.stages[-2], [0, 1], steps=2, seed=0)
    assert result.images.shape == (2, 3, 64, 64)  # the size the model was built for
    sim = layer_similarity(fp32, int8, x.split(4), list(arch.blocks))
    assert sim.values.shape == (len(arch.blocks),) * 2 and np.isfinite(np.diag(sim.values)).all()


def test_the_study_compares_the_described_blocks(mobilenet_zoo, tmp_path):
    family, path = MOBILENET, mobilenet_zoo
    assert study_main(["--zoo", str(path), "--out", str(tmp_path), *STUDY]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    blocks = list(get_architecture(get_family(family).arch).blocks)
    assert metrics["blocks"] == blocks
    assert metrics["metrics"][f"vs_fp32.cka.{blocks[-1]}"]["variants"].keys() == {"int8", "sparse90"}
    assert "gradcam.pointing_game" in metrics["metrics"]  # the shapes' masks score the maps
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_openvino_stores_every_convolution_of_int8_at_8_bits(mobilenet_zoo, tmp_path):
    path = mobilenet_zoo
    report = deploy.export(path / "int8", tmp_path, measure_speed=False)
    model = load_variant(path / "int8").model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = sum(m.groups > 1 for m in convs)
    ops = {}
    for layer in report["weights"]["layers"]:
        ops.setdefault(layer["type"], set()).add(layer["element_type"])
    assert sum(layer["type"] in ("Convolution", "GroupConvolution") for layer in report["weights"]["layers"]) \
        == len(convs)
    assert depthwise == 17 and ops["GroupConvolution"] == {"i8"}  # MobileNetV2's depthwise convolutions
    assert ops["Convolution"] <= {"i8", "u8"} and ops["MatMul"] <= {"i8", "u8"}
    fp32_report = deploy.export(path / "fp32", tmp_path / "fp32", measure_speed=False)
    assert fp32_report["weights"]["stored"] == {"f32": len(convs) + 1}
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # f32 kernels (a CPU with AMX would otherwise run the IR in bfloat16): the conversion is exact.
    compiled = ov.Core().compile_model(str(tmp_path / "fp32" / deploy.IR_XML), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        expected = load_variant(path / "fp32").model(x).numpy()
    assert np.allclose(compiled(x.numpy())[0], expected, rtol=1e-4, atol=1e-4)


def test_the_model_card_names_the_8_bit_layers_and_takes_a_variant_without_top1(zoo):
    family, path = zoo
    config = read_config(path / "int8")
    arch = get_architecture(config["architecture"]["arch"])
    # A photo family's variants have no labels: agreement with FP32, no top-1.
    no_top1 = {**config, "metrics": {k: v for k, v in config["metrics"].items() if "top" not in k}}
    text = str(model_card(no_top1, f"org/{family}-int8", base_model=f"org/{family}-fp32"))
    assert f"`{arch.first_conv}`" in text and f"`{arch.classifier}`" in text
    assert "Top-1" not in text and "Agreement with FP32" in text


def test_every_space_tab_works_on_the_family(mobilenet_zoo, tmp_path):
    family, path = MOBILENET, mobilenet_zoo
    session = Session(resolve(SourceConfig(families=(family,), zoo=path, source="local")), cache_dir=tmp_path)
    arch = architecture_of(session.zoo(family).variants["fp32"].model)
    assert session.layers(family) == list(arch.stages) and session.default_layer(family) == arch.gradcam_layer
    session.precompute(family, steps=8)
    build_demo(session, examples={family: []})  # the page builds: layer choices, columns, Study tab
    h = Handlers(session, tmp_path / "maps")
    image = str(tmp_path / "image.png")
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(image)
    out = h.explain(image, family, "gradient", ["fp32", "int8", "sparse90"])
    assert [out[4 + 4 * i] for i in range(3)] == ["### FP32", "### INT8 (W8A8)", "### 90% sparse"]
    assert all(Path(out[4 + 4 * i + k]).exists() for i in range(3) for k in (2, 3))
    assert len(out[-1]) == 2  # the table: int8 and sparse90 against FP32
    features = h.features(family, arch.stages[0], "0, 1", 8, ["fp32", "int8"], progress=lambda *a, **k: None)
    assert [caption for _, caption in features[4 + 1]] == [f"{arch.stages[0]} channel {c}" for c in (0, 1)]
    gallery, reading = h.representations(family, ["fp32", "int8"])
    assert len(gallery) == 1 + len(session.controls(family)) and "FP32 vs **int8**" in reading
    rows, note = h.models(family)  # its OpenVINO columns fill in the background: test_openvino_... above
    assert [r[0] for r in rows] == [title(v) for v in session.variant_names(family)]
    assert all(r[1] is not None and r[4] > 0 for r in rows)  # top-1 and file size
