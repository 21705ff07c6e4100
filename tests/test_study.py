"""``python -m study`` on a tiny ladder-like zoo, and the per-class tests on constructed predictions.

The zoo (built through the training CLI, 2 steps each: real formats, untrained): the tiny zoo's
fp32, fp32-seed1, int8, sparse90, plus fp32-seed2 and sparse50 built here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from space.study_tab import add_study_tab, load_study, study_directory
from study.__main__ import main
from study.classes import holm, mcnemar_midp, paired_difference, per_class
from training.cli import main as training_main

TINY = ["--images", "32", "--batch-size", "8", "--groups", "4", "--deletion-images", "4", "--deletion-steps", "2",
        "--match-images", "16", "--exemplars", "2", "--seed", "3"]
STEPS = ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2"]


@pytest.fixture(scope="module")
def ladder_zoo(tiny_zoo, tmp_path_factory) -> Path:
    zoo = tmp_path_factory.mktemp("ladder")
    for d in tiny_zoo.iterdir():
        if (d / "config.json").exists():
            (zoo / d.name).symlink_to(d.resolve(), target_is_directory=True)
    assert training_main(["fp32", "--family", "resnet18-shapes", "--seed", "2", "--out", str(zoo / "fp32-seed2"),
                          *STEPS]) == 0
    assert training_main(["sparse", "--sparsity", "0.5", "--fp32", str(zoo / "fp32"), "--out", str(zoo / "sparse50"),
                          *STEPS]) == 0
    return zoo


@pytest.fixture(scope="module")
def runs(ladder_zoo, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The one-process study, and the same study collected in two processes' worth of shards."""
    out = tmp_path_factory.mktemp("study")
    assert main(["--zoo", str(ladder_zoo), "--out", str(out / "one"), *TINY]) == 0
    shards = out / "shards"
    assert main(["collect", "--zoo", str(ladder_zoo), "--variant", "fp32", "--variant", "fp32-seed1",
                 "--variant", "fp32-seed2", "--shards", str(shards), *TINY]) == 0
    assert main(["collect", "--zoo", str(ladder_zoo), "--variant", "int8", "--variant", "sparse50",
                 "--variant", "sparse90", "--shards", str(shards), *TINY]) == 0
    assert main(["report", "--zoo", str(ladder_zoo), "--shards", str(shards), "--out", str(out / "gathered")]) == 0
    return ladder_zoo, out / "one", out / "gathered"


def _estimates(node, path=""):
    if isinstance(node, dict):
        if {"value", "low", "high"} <= set(node):
            yield path, node
        for k, v in node.items():
            yield from _estimates(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _estimates(v, f"{path}[{i}]")


def test_sharded_study_is_byte_identical_to_the_one_process_study(runs):
    _, one, gathered = runs
    assert (one / "metrics.json").read_bytes() == (gathered / "metrics.json").read_bytes()


def test_every_interval_contains_its_estimate(runs):
    _, one, _ = runs
    metrics = json.loads((one / "metrics.json").read_text())
    found = list(_estimates(metrics))
    assert len(found) > 200
    with_interval = 0
    for path, e in found:
        if e["value"] is not None and e["low"] is not None:
            with_interval += 1
            assert e["low"] <= e["value"] <= e["high"], (path, e)
    assert with_interval > 150


def test_seed_null_dose_response_and_class_tables(runs):
    _, one, _ = runs
    m = json.loads((one / "metrics.json").read_text())
    assert m["seeds"] == ["fp32", "fp32-seed1", "fp32-seed2"]
    assert m["seed_pairs"] == ["fp32 vs fp32-seed1", "fp32 vs fp32-seed2", "fp32-seed1 vs fp32-seed2"]
    assert m["dose_response"]["sparse"]["levels"] == ["sparse50", "sparse90"]
    assert m["dose_response"]["sparse"]["x"] == [50.0, 90.0]
    assert m["dose_response"]["quantized"]["levels"] == ["int8"]
    agreement = m["metrics"]["vs_fp32.agreement"]
    assert len(agreement["null_values"]) == 3 and set(agreement["variants"]) == {"int8", "sparse50", "sparse90"}
    cka = m["metrics"]["vs_fp32.cka.layer4.1"]
    assert set(cka["null_values"]) == set(m["seed_pairs"])
    for row in cka["variants"].values():
        assert row["verdict"]["null"] == 3 and row["verdict"]["contrast"] is not None
    assert set(m["metrics"]["top1"]["null_values"]) == {"fp32", "fp32-seed1", "fp32-seed2"}
    for axis in m["dose_response"].values():
        for r in axis["metrics"].values():
            assert r["first_worse"] is None or r["first_worse"] in axis["levels"]
    classes = m["classes"]["sparse90"]
    assert len(classes["classes"]) == 10 and "exemplars" in classes and classes["welch"] is None
    assert sum(r["images"] for r in classes["classes"]) == 32
    lm = m["instruments"]["layer_matching"]
    assert lm["cka"]["total"] == 3 * 2 * 8 and 0 <= lm["cka"]["hits"] <= lm["cka"]["total"]


def test_layer_diagnostics(runs):
    _, one, _ = runs
    d = json.loads((one / "metrics.json").read_text())["diagnostics"]
    assert d["sparse90"]["weights"]["overall_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert d["sparse50"]["weights"]["overall_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert d["int8"]["bits"] == {"weights": [8], "activations": [8]}
    for block in d["int8"]["blocks"].values():
        assert np.isfinite(block["sqnr_db"]) and 0 <= block["clipped_fraction"] <= 1
    # Global magnitude pruning at 90% leaves some filters whose every weight is zero.
    assert all(v["dead_filters"] <= v["filters"] for v in d["sparse90"]["weights"]["layers"].values())


def test_report_html_is_self_contained_and_the_space_tab_reads_it(runs, tmp_path):
    zoo, one, _ = runs
    page = (one / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= 3
    assert not re.search(r"(https?:|ftp:)?//[\w.-]+\.[a-z]{2,}", page, re.IGNORECASE)
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, re.IGNORECASE)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    view = load_study(one, [f"c{i}" for i in range(10)])
    assert view is not None and view.figures and len(view.class_rows) > 0
    assert load_study(tmp_path, []) is None
    assert study_directory(tmp_path, zoo).parent == tmp_path
    import gradio as gr

    with gr.Blocks():
        add_study_tab(tmp_path, {"resnet18-shapes": zoo})


def test_bad_input_gets_a_clear_message(tmp_path, caplog):
    assert main(["--zoo", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no fp32 variant" in caplog.text
    assert main(["report", "--zoo", str(tmp_path), "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_per_class_test_finds_the_damaged_class_and_no_other():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    right_ref = rng.random(1000) < 0.9
    right = right_ref.copy()
    flip = rng.random(1000)
    right[(labels == 3) & right_ref & (flip < 0.4)] = False  # class 3 damaged on purpose
    noise = (labels != 3) & (flip > 0.97)  # elsewhere: a few flips both ways
    right[noise] = ~right[noise]
    rows = per_class(labels, right_ref, right, 10)
    assert [r["class"] for r in rows if r["hurt_significantly"]] == [3]
    assert rows[3]["change"]["high"] < 0 and rows[3]["p_holm"] < 1e-6
    for r in rows:
        assert r["change"]["low"] <= r["change"]["value"] <= r["change"]["high"]


def test_mcnemar_holm_and_paired_interval_by_hand():
    # 12 images hurt, 2 helped: two-sided mid-p = 2 (P(X <= 2) - P(X = 2) / 2), X ~ Bin(14, 1/2).
    assert mcnemar_midp(12, 2) == pytest.approx(2 * (1 + 14 + 91 / 2) / 2 ** 14)
    assert mcnemar_midp(0, 0) == 1.0 and mcnemar_midp(5, 5) == pytest.approx(1.0)
    assert holm([0.01, 0.04, 0.3]) == pytest.approx([0.03, 0.08, 0.3])
    assert holm([0.04, 0.01]) == pytest.approx([0.04, 0.02])
    e = paired_difference(hurt=0, helped=0, n=50, confidence=0.95)
    assert e.value == 0 and e.low < 0 < e.high
