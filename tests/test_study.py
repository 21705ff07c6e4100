"""``python -m study`` on a tiny zoo with four FP32 seeds: the verdicts, the leave-one-seed-out
check, CCA's floor and baseline, the layer-matching check, and the report drawn from the shards.

The zoo (built through the training CLI, 2 steps each: real formats, untrained): the tiny zoo's
fp32, fp32-seed1, int8, sparse90, plus fp32-seed2, fp32-seed3 and sparse50 built here. Per-class
tests on constructed predictions are in ``tests/test_verdicts.py``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from space.study_tab import add_study_tab, load_study, study_directory, study_view
from study.__main__ import main
from study.null import fixed_sequence
from study.shard import Shard
from surgery.loading import load_variant
from surgery.similarity import MinibatchCKA, cca
from training.cli import main as training_main

pytestmark = pytest.mark.e2e  # the study CLI end to end: one process, then in shards gathered

TINY = ["--images", "32", "--batch-size", "8", "--groups", "4", "--deletion-images", "4", "--deletion-steps", "2",
        "--match-images", "16", "--exemplars", "2", "--seed", "3"]
STEPS = ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2"]
SEEDS = ["fp32", "fp32-seed1", "fp32-seed2", "fp32-seed3"]
# CCA's floor of effective rows per direction, lowered from the study's 8 so that this tiny study (32
# images) has blocks on both sides of it: at 8 none passes (layer1: 8192 rows, design effect 31-37, 64
# directions; layer2: 2048 rows, 6-7, 128), and what is checked of reported blocks would check nothing.
FLOOR = 2


@pytest.fixture(scope="module")
def four_seed_zoo(tiny_zoo, tmp_path_factory) -> Path:
    zoo = tmp_path_factory.mktemp("four-seeds")
    for d in tiny_zoo.iterdir():
        if (d / "config.json").exists():
            (zoo / d.name).symlink_to(d.resolve(), target_is_directory=True)
    for seed in (2, 3):
        assert training_main(["fp32", "--family", "resnet18-shapes", "--seed", str(seed),
                              "--out", str(zoo / f"fp32-seed{seed}"), *STEPS]) == 0
    assert training_main(["sparse", "--sparsity", "0.5", "--fp32", str(zoo / "fp32"), "--out", str(zoo / "sparse50"),
                          *STEPS]) == 0
    return zoo


@pytest.fixture(scope="module")
def runs(four_seed_zoo, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The one-process study, and the same study gathered, where no model can be loaded (the report
    needs none), from shards of two runs: the one-process study's seed shards and the compressed
    variants' collected apart."""
    out = tmp_path_factory.mktemp("study")
    shards = out / "shards"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cca, "ROWS_PER_DIRECTION_FLOOR", FLOOR)  # the study reads it from there
        assert main(["--zoo", str(four_seed_zoo), "--out", str(out / "one"), *TINY]) == 0
        shards.mkdir()
        for seed in SEEDS:
            for suffix in (".json", ".npz"):
                shutil.copy(out / "one" / "shards" / f"{seed}{suffix}", shards)
        assert main(["collect", "--zoo", str(four_seed_zoo), "--variant", "int8", "--variant", "sparse50",
                     "--variant", "sparse90", "--shards", str(shards), *TINY]) == 0

        def refuse(*args, **kwargs):
            raise AssertionError("the report loaded a model")
        patch.setattr("study.collect.load_variant", refuse)
        assert main(["report", "--zoo", str(four_seed_zoo), "--shards", str(shards), "--out", str(out / "gathered")]) == 0
    return four_seed_zoo, out / "one", out / "gathered"


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


def _metrics(runs) -> dict:
    return json.loads((runs[1] / "metrics.json").read_text())


def test_every_verdict_is_the_prediction_bound_of_the_seed_values(runs):
    m = _metrics(runs)
    assert m["seeds"] == SEEDS and len(m["seed_pairs"]) == 6
    assert "prediction bound" in m["rule"] and "5%" in m["rule"]
    t = scipy_stats.t.ppf(0.95, 3)
    checked = 0
    for key, entry in m["metrics"].items():
        values = entry["null_values"]
        if len(values) < 2:  # e.g. CCA where the seeds' blocks sit below the floor: no band, no verdict
            assert not any(row["verdict"]["testable"] for row in entry["variants"].values()), key
            continue
        if entry["kind"] == "single":
            centre, spread, m_centre = np.mean(list(values.values())), np.std(list(values.values()), ddof=1), 4
        else:
            with_fp32 = [v for k, v in values.items() if k.startswith("fp32 vs ")]
            centre, spread, m_centre = np.mean(with_fp32), np.std(list(values.values()), ddof=1), 3
        for name, row in entry["variants"].items():
            v = row["verdict"]
            if not v["testable"]:
                continue
            assert v["seeds"] == 4 and v["centre"] == pytest.approx(centre, abs=1e-5), (key, name)
            half = t * spread * math.sqrt(1 + 1 / m_centre)
            assert v["bound"] == pytest.approx([centre - half, centre + half], abs=1e-5), (key, name)
            value = row["estimate"]["value"]
            side = "below" if value < v["bound"][0] else "above" if value > v["bound"][1] else None
            assert v["side"] == side and v["worse"] == (side == ("below" if entry["higher_is_better"] else "above"))
            checked += 1
    assert checked > 50


def test_first_level_worse_is_read_by_fixed_sequence_testing(runs):
    m = _metrics(runs)
    assert m["dose_response"]["sparse"]["levels"] == ["sparse50", "sparse90"]
    assert m["dose_response"]["sparse"]["x"] == [50.0, 90.0]
    assert m["dose_response"]["quantized"]["levels"] == ["int8"]
    for axis in m["dose_response"].values():
        for metric, r in axis["metrics"].items():
            worse = {n: m["metrics"][metric]["variants"][n]["verdict"]["worse"] for n in r["levels"]}
            assert (r["first_worse"], r["tested"]) == fixed_sequence(axis["levels"], worse), metric
            assert r["tested"][0] == axis["levels"][-1]  # the harshest level is tested first


def test_leave_one_seed_out_check_runs_and_is_recorded(runs):
    m = _metrics(runs)
    check = m["null_check"]
    assert list(check["held_out"]) == SEEDS and check["seeds"] == 4
    singles = [k for k, e in m["metrics"].items() if e["kind"] == "single"]
    comparisons = [k for k, e in m["metrics"].items() if e["kind"] == "comparison"]
    assert check["cells"] == sum(r["cells"] for r in check["held_out"].values())
    assert check["cells"] > 4 * len(singles)  # comparisons were judged too: three seeds remain for their pairs
    assert check["flagged"] == sum(len(r["worse"]) for r in check["held_out"].values())
    assert check["rate"] == pytest.approx(check["flagged"] / check["cells"], abs=1e-6)
    t = scipy_stats.t.ppf(0.95, 2)
    compared = 0
    for held, row in check["held_out"].items():
        assert set(row["worse"]) <= set(singles + comparisons)
        for metric in singles:  # a held-out seed is flagged exactly when it lies beyond the other three's bound
            entry = m["metrics"][metric]
            if held not in entry["null_values"] or len(entry["null_values"]) < 4:
                continue
            others = [v for s, v in entry["null_values"].items() if s != held]
            value, half = entry["null_values"][held], t * np.std(others, ddof=1) * math.sqrt(1 + 1 / 3)
            beyond = (value < np.mean(others) - half) if entry["higher_is_better"] else (value > np.mean(others) + half)
            if abs(abs(value - np.mean(others)) - half) > 1e-5:  # not on the bound, up to the rounding in the file
                assert (metric in row["worse"]) == beyond, (held, metric)
                compared += 1
    assert compared >= 0.9 * 4 * len(singles) > 0, compared  # every held-out seed, on (nearly) every single metric
    page = (runs[1] / "report.html").read_text()
    assert f"{check['flagged']} of {check['cells']} (held-out seed, metric) cells" in page


def test_cca_is_bias_corrected_beside_a_shuffled_baseline_and_only_above_its_floor(runs):
    m = _metrics(runs)
    blocks = m["cca"]["blocks"]
    assert m["cca"]["floor_rows_per_direction"] == FLOOR
    reported = {b for b, v in blocks.items() if v["reported"]}
    for block, v in blocks.items():
        assert v["rows"] == 32 * (16 if block.startswith(("layer3", "layer4")) else 256 if block.startswith("layer1")
                                  else 64)
        assert v["design_effect"] >= 1
        assert v["reported"] == (v["rows"] / v["design_effect"] >= FLOOR * v["directions"])
    # 512 rows for 512 channels: never; layer1's and layer2's blocks pass the lowered floor.
    assert not {"layer4.0", "layer4.1"} & reported
    assert {"layer1.0", "layer1.1"} <= reported, blocks
    page = (runs[1] / "report.html").read_text()
    # The table is the first compressed variant's (int8); each variant passes or not on its own design
    # effect, so a block below the floor for int8 may still hold another variant's value.
    for block in set(blocks) - reported:
        assert "int8" not in m["metrics"].get(f"vs_fp32.svcca.{block}", {}).get("variants", {})
        assert any(w.startswith(f"{block}: ") and "not reported" in w for w in m["cca"]["warnings"])
        assert f"{block}: CCA on" in page
    for block in reported:
        for method in ("svcca", "pwcca"):
            row = m["metrics"][f"vs_fp32.{method}.{block}"]["variants"]["int8"]
            assert row["shuffled"] is not None
            # bias-corrected: the correction pulls the overfitting down
            assert row["estimate"]["value"] != pytest.approx(row["plug_in"], abs=1e-9)
            assert row["shuffled_plug_in"] > row["shuffled"]["value"]
            # PWCCA on SVCCA's dimensions, fixed once from all images, at most the channels
            assert all(1 <= k <= blocks[block]["directions"] for k in row["kept"])
            assert row["kept"] == m["metrics"][f"vs_fp32.svcca.{block}"]["variants"]["int8"]["kept"]


def test_layer_matching_counts_the_argmax_of_the_stored_similarities(runs):
    zoo, one, _ = runs
    m = _metrics(runs)
    lm = m["instruments"]["layer_matching"]
    assert set(lm["pairs"]) == set(m["seed_pairs"]) and lm["grid"] == 4 and lm["directions"] == 32
    for pair, entry in lm["pairs"].items():
        a, b = pair.split(" vs ")
        arrays = Shard.load(one / "shards" / f"{b}.json").arrays
        cka = MinibatchCKA.from_batch_values(arrays[f"{a}.cka.cross"], arrays[f"{a}.cka.self_x"],
                                             arrays[f"{a}.cka.self_y"], int(arrays[f"{a}.cka.images"])).compute().numpy()
        for method, matrix in (("cka", cka), ("svcca", arrays[f"{a}.match.svcca"])):
            hits = int((matrix.argmax(1) == np.arange(8)).sum() + (matrix.argmax(0) == np.arange(8)).sum())
            assert entry[method]["hits"] == hits and entry[method]["total"] == 16, (pair, method)
            best_other = [np.delete(matrix[i], i).max() for i in range(8)]
            assert entry[method]["margins"][:8] == pytest.approx([matrix[i, i] - best_other[i] for i in range(8)],
                                                                 abs=1e-5)
    assert lm["cka"]["hits"] == sum(e["cka"]["hits"] for e in lm["pairs"].values())


def test_class_tables_use_the_exact_test_and_the_seeds(runs):
    m = _metrics(runs)
    classes = m["classes"]["sparse90"]
    assert len(classes["classes"]) == 10 and "exemplars" in classes and classes["welch"] is None
    assert sum(r["images"] for r in classes["classes"]) == 32
    for r in classes["classes"]:
        if r["images"]:
            assert "seed_rule" in r and r["hurt_significantly"] == (r["hurt_more"] and r["seed_rule"]["worse"])
            assert r["detectable_drop"] is None or 0 < r["detectable_drop"] <= 1
    assert "seed_rule" not in m["classes"]["fp32-seed1"]["classes"][0]  # the seeds are the null, not judged


def test_layer_diagnostics(runs):
    zoo, one, _ = runs
    d = _metrics(runs)["diagnostics"]
    assert d["sparse90"]["weights"]["overall_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert d["sparse50"]["weights"]["overall_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert d["int8"]["bits"] == {"weights": [8], "activations": [8]}
    for block in d["int8"]["blocks"].values():
        assert np.isfinite(block["sqnr_db"]) and 0 <= block["clipped_fraction"] <= 1
    # Dead filters and zero shares, counted again from the checkpoint's own weights.
    model, _ = load_variant(zoo / "sparse90")
    layers = d["sparse90"]["weights"]["layers"]
    for name, module in model.named_modules():
        if name in layers:
            w = module.weight.detach().reshape(module.weight.shape[0], -1)
            assert layers[name]["dead_filters"] == int((w == 0).all(1).sum()), name
            assert layers[name]["sparsity"] == pytest.approx(float((w == 0).double().mean()), abs=1e-6), name


def test_report_html_is_self_contained_and_the_space_tab_reads_it(runs, tmp_path):
    zoo, one, gathered = runs
    page = (one / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= 3
    assert not re.search(r"(https?:|ftp:)?//[\w.-]+\.[a-z]{2,}", page, re.IGNORECASE)
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, re.IGNORECASE)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    # One gallery per variant with compression-identified exemplars (the tiny zoo may have none).
    with_exemplars = {f"exemplars-{name}.png" for name, entry in _metrics(runs)["classes"].items()
                      if entry.get("exemplars")}
    assert {p.name for p in (gathered / "figures").glob("exemplars-*.png")} == with_exemplars
    assert "false-positive rate 5% per metric" in page
    view = load_study(one, [f"c{i}" for i in range(10)])
    assert view is not None and view.figures and len(view.class_rows) > 0
    assert load_study(tmp_path, []) is None
    cache = tmp_path / "cache"
    study_directory(cache, zoo).parent.mkdir(parents=True)
    study_directory(cache, zoo).symlink_to(one, target_is_directory=True)
    figures, reading, table = study_view(cache, {"resnet18-shapes": zoo}, "resnet18-shapes")
    assert [Path(f).name for f, _ in figures] == sorted(p.name for p in (one / "figures").glob("dose-*.png"))
    assert reading.startswith("Rule: one-sided 95% prediction bound") and "cells" in reading
    assert "detectable drop" in table["headers"]
    import gradio as gr

    with gr.Blocks() as demo:
        add_study_tab(cache, {"resnet18-shapes": zoo})
    assert "study" in {getattr(fn, "api_name", None) for fn in demo.fns.values()}


def test_bad_input_gets_a_clear_message(tmp_path, caplog):
    assert main(["--zoo", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no fp32 variant" in caplog.text
    assert main(["report", "--zoo", str(tmp_path), "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
