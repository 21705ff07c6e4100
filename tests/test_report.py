"""``python -m space.report``: runs end to end, is reproducible from its seed, and stands alone."""

from __future__ import annotations

import json
import re

import pytest

from space.report import main

# Small enough for CI; every part of the report still runs (CCA and activation maximisation too).
TINY = ["--images", "8", "--repr-images", "16", "--cka-batches", "4", "--batch-size", "16", "--n-boot", "50",
        "--cca-boot", "5", "--deletion-images", "4", "--deletion-steps", "2", "--actmax-channels", "2",
        "--actmax-steps", "3", "--shown", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def two_runs(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    for run in ("a", "b"):
        assert main(["--zoo", str(tiny_zoo), "--out", str(out / run), *TINY]) == 0
    return tiny_zoo, out / "a", out / "b"


def test_report_is_reproducible_from_its_seed(two_runs):
    _, a, b = two_runs
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()


def test_report_covers_every_variant_with_intervals(two_runs):
    zoo, a, _ = two_runs
    metrics = json.loads((a / "metrics.json").read_text())
    variants = sorted(d.name for d in zoo.iterdir() if (d / "config.json").exists())
    assert sorted(metrics["variants"]) == variants
    assert sorted(metrics["representations"]) == sorted(v for v in variants if v != "fp32")
    for name, v in metrics["variants"].items():
        for method in ("gradcam", "saliency"):
            for score in ("pointing_game", "pointing_game_tolerant", "energy_in_mask", "deletion_auc",
                          "insertion_auc") + (("spearman_vs_fp32", "iou_top_vs_fp32") if name != "fp32" else ()):
                e = v["maps"][method][score]
                assert e["unit"] == "image" and e["n_boot"] == 50
                if e["value"] is not None:
                    assert e["low"] - 1e-9 <= e["value"] <= e["high"] + 1e-9, (name, method, score, e)
        assert v["top1"]["n"] == 8
    for name, sims in metrics["representations"].items():
        assert set(sims) == {"cka", "svcca", "pwcca"}
        assert len(sims["cka"]["values"]) == 9  # 8 residual blocks + fc
        assert sims["cka"]["num_images"] == 16
    controls = [v for v in variants if v.startswith("fp32-seed")]
    assert sorted(metrics["seed_control"]) == controls
    for control in controls:  # paired differences: (variant vs FP32) - (control vs FP32), per image
        differences = metrics["seed_control"][control]
        assert sorted(differences) == sorted(v for v in variants if v != "fp32" and v not in controls)
        assert differences["int8"]["agreement_with_fp32"]["n"] == 8
    assert {row["variant"] for row in metrics["actmax"]["rows"]} >= {"fp32", "int8"}
    assert {row["gradient"] for row in metrics["actmax"]["rows"] if row["variant"] == "int8"} == {"ste", "true"}


def test_report_html_is_self_contained(two_runs):
    _, a, _ = two_runs
    page = (a / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= 5
    assert not re.search(r"(https?:|ftp:)?//[\w.-]+\.[a-z]{2,}", page, re.IGNORECASE)
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, re.IGNORECASE)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "<link" not in page and "<script" not in page and "url(" not in page


def test_report_refuses_a_directory_without_fp32(tmp_path, caplog):
    assert main(["--zoo", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no fp32 variant" in caplog.text
