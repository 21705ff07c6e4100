"""A pretrained family (mobilenetv2-imagenet): FP32 is torchvision's weights as they are, so it has no seeds.

The zoo (``mobilenet_imagenet_zoo``) is built through the training CLI on a stand-in ImageNet
folder (``--data-root``: one random image per class) with FP32 from torchvision's real file: what
the training CLI, the study, the Space and the model card say about a family that has no FP32
seeds, and the offline message of its one possible other training run (torchvision's
``IMAGENET1K_V2``, another recipe).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torchvision
from nncf.torch.quantization.layers import AsymmetricQuantizer, SymmetricQuantizer

from conftest import IMAGENET_STAND_IN_ARGS
from hub_export.card import model_card
from space.session import Session
from space.study_tab import load_study
from space.zoo_source import BuildOptions, SourceConfig, resolve
from study.__main__ import main as study_main
from surgery import compression
from surgery.checkpoint import load_local, read_config
from surgery.registry import get_family
from surgery.variants import parse_variant, sort_variants
from training.cli import Settings, _override
from training.cli import main as training_main

FAMILY = "mobilenetv2-imagenet"
V2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
NO_CLAIM = "no variant is said to differ from retraining"


def _data(root: Path) -> list[str]:
    return ["--data-root", str(root), *IMAGENET_STAND_IN_ARGS]


def test_seed_controls_are_refused_at_once_naming_the_other_recipe(tmp_path, caplog):
    started = time.perf_counter()
    assert training_main(["zoo", "--family", FAMILY, "--out", str(tmp_path / "zoo"), "--seeds", "2"]) == 2
    assert time.perf_counter() - started < 5  # before any data or model is touched
    assert "has no FP32 seeds" in caplog.text and "fp32-seed1" in caplog.text
    assert "fp32-recipe1 (torchvision's IMAGENET1K_V2, another recipe)" in caplog.text
    # The Space plans no seed control either; INT8's calibration alone comes first (the first page).
    assert BuildOptions().plan(FAMILY) == ["fp32", "int8-ptq", "int8", "sparse90"]


def test_another_recipe_offline_is_one_message_naming_torchvisions_download(imagenet_stand_in, tmp_path, monkeypatch,
                                                                            caplog, mobilenet_weights):
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("Name or service not known")))
    spec = parse_variant("fp32-recipe1")
    assert spec.is_recipe_control and not spec.is_seed_control and spec.title == "FP32, another recipe"
    assert training_main(["zoo", "--family", FAMILY, "--out", str(tmp_path / "zoo"), "--variants", "fp32-recipe1",
                          *_data(imagenet_stand_in)]) == 2
    assert V2.url in caplog.text and "no package on PyPI is known to ship it" in caplog.text
    assert "pass --epochs" not in caplog.text  # another recipe's run is its weights or nothing
    assert not (tmp_path / "zoo" / "fp32-recipe1" / "config.json").exists()


def test_the_card_says_fp32_is_torchvisions_weights_as_they_are(mobilenet_imagenet_zoo):
    card = str(model_card(read_config(mobilenet_imagenet_zoo / "fp32"), f"org/{FAMILY}-fp32"))
    assert "torchvision's pretrained IMAGENET1K_V1 weights, as they are (no seeds)" in card
    assert "71.878%" in card  # the published figure of these very weights, from the registry's card text


def test_int8_activations_have_zero_points_as_the_config_and_the_card_say(mobilenet_imagenet_zoo):
    quantizers = compression.quantizer_ranges(load_local(mobilenet_imagenet_zoo / "int8").model)  # as reloaded
    activations, weights = [q for q in quantizers if not q.weights], [q for q in quantizers if q.weights]
    assert activations and all(isinstance(q.module, AsymmetricQuantizer) for q in activations)
    assert weights and all(isinstance(q.module, SymmetricQuantizer) for q in weights)
    # A zero point in use: ranges that are not centred on 0, the signed residual sums' among them.
    assert any(float(q.low.min()) < 0 and abs(float(q.low.min() + q.high.max())) > 0.1 * float(q.high.max() - q.low.min())
               for q in activations)
    config = read_config(mobilenet_imagenet_zoo / "int8")
    assert config["compression"]["activation_quantizers"] == "asymmetric"
    assert "weights per-channel symmetric; activations per-tensor asymmetric" in str(
        model_card(config, f"org/{FAMILY}-int8"))


def test_post_training_variants_are_named_ordered_and_refused_where_they_do_not_apply():
    spec = parse_variant("w4a8-dw8-ptq-seed1")
    assert spec.post_training and spec.keep_depthwise and spec.seed == 1 and spec.base == "w4a8-dw8-ptq"
    assert parse_variant("int8-ptq").title == "INT8 (W8A8), post-training" and not parse_variant("int8").post_training
    assert sort_variants(["int8-ptq", "w4a8", "int8", "fp32"]) == ["fp32", "int8", "int8-ptq", "w4a8"]
    for bad in ("sparse50-ptq", "fp32-ptq", "int8-ptq-dw8"):
        with pytest.raises(ValueError, match="ptq|not a variant name"):
            parse_variant(bad)


def test_int8_ptq_is_int8s_calibration_alone_whatever_the_epochs_asked(mobilenet_imagenet_zoo):
    c = get_family(FAMILY).compression
    assert c.for_variant(parse_variant("int8")).epochs > 0  # the family's INT8 is distilled after calibrating
    assert c.for_variant(parse_variant("int8-ptq")).epochs == 0
    assert _override(c.for_variant(parse_variant("int8-ptq")), Settings(epochs=3), fine_tunes=False).epochs == 0
    ptq, tuned = (read_config(mobilenet_imagenet_zoo / v)["compression"] for v in ("int8-ptq", "int8"))
    assert ptq["qat_steps"] == 0 and "distillation" not in ptq["method"] and "distillation" not in ptq
    assert tuned["qat_steps"] > 0 and tuned["method"] == ptq["method"] + " + distillation from FP32"
    assert ptq["weight_bits"] == ptq["activation_bits"] == 8 and ptq["activation_quantizers"] == "asymmetric"
    cards = [str(model_card(read_config(mobilenet_imagenet_zoo / v), f"org/{FAMILY}-{v}")) for v in ("int8-ptq", "int8")]
    assert "(calibration only, no fine-tuning)" in cards[0] and "then distillation from FP32's outputs)" in cards[1]


def test_the_study_says_there_is_no_null_and_claims_nothing(mobilenet_imagenet_zoo, imagenet_stand_in, tmp_path):
    assert study_main(["--zoo", str(mobilenet_imagenet_zoo), "--out", str(tmp_path),
                       "--data-root", str(imagenet_stand_in), "--images", "8", "--batch-size", "4", "--groups", "2",
                       "--deletion-images", "0", "--match-images", "4", "--exemplars", "1"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert NO_CLAIM in metrics["no_null"] and metrics["seeds"] == ["fp32"]
    verdicts = [row["verdict"] for entry in metrics["metrics"].values() for row in entry["variants"].values()
                if "verdict" in row]
    assert verdicts and all(v["null"] == 0 and not v["worse"] and v["side"] is None for v in verdicts)
    # int8-ptq is compared like any variant, and is int8's starting point rather than a level of the axis.
    assert all("int8-ptq" in entry["variants"] for entry in metrics["metrics"].values())
    assert metrics["dose_response"]["quantized"]["levels"] == ["int8"]
    assert NO_CLAIM in (tmp_path / "report.html").read_text()
    tab = load_study(tmp_path, list(get_family(FAMILY).class_names))  # the Space's Study tab
    assert NO_CLAIM in tab.reading and "worse than" not in tab.reading


def test_the_space_says_there_are_no_seeds_and_claims_nothing(mobilenet_imagenet_zoo, tmp_path):
    session = Session(resolve(SourceConfig(families=(FAMILY,), zoo=mobilenet_imagenet_zoo, source="local")), tmp_path)
    assert session.controls(FAMILY) == []
    reading = session.representations(FAMILY, ["fp32", "int8"]).reading
    assert NO_CLAIM in reading and "IMAGENET1K_V1" in reading
    assert "changes the representations" not in reading
