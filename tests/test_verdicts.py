"""The study's verdicts on constructed data: the seed rule, fixed-sequence testing, class damage,
the jackknife bias correction, and the one rule the Space's Representations tab shares with the study.

No zoo: every input is built here, so each test knows the right answer.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from study.classes import detectable_loss, holm, paired_difference, per_class, relative_change_p
from study.null import Null, fixed_sequence, layer_reading, verdict
from surgery.registry import get_family
from surgery.similarity import Jackknife, LayerSimilarity, cka, grouped_mean

REPO = Path(__file__).resolve().parents[1]


def _jk(value: float, spread: float = 0.0, groups: int = 10) -> Jackknife:
    """A scalar jackknife whose leave-one-out values scatter by ``spread`` around ``value``."""
    offsets = np.linspace(-1, 1, groups) * spread
    return Jackknife(value, value + offsets - offsets.mean(), 100)


def test_prediction_bound_follows_the_formula_and_flags_only_beyond_it():
    seeds = [_jk(v) for v in (0.90, 0.92, 0.94)]
    null = Null(seeds, seeds, 3)
    # mean 0.92, s = 0.02, t(2, 0.95) = 2.919986: bound = 0.92 -/+ 2.919986 * 0.02 * sqrt(4 / 3)
    half = 2.919986 * 0.02 * math.sqrt(4 / 3)
    inside = verdict(_jk(0.92 - half + 0.001), null, True, 0.05)
    below = verdict(_jk(0.92 - half - 0.001), null, True, 0.05)
    assert inside["bound"][0] == pytest.approx(0.92 - half, abs=1e-6)
    assert inside["testable"] and inside["side"] is None and not inside["worse"]
    assert below["side"] == "below" and below["worse"]
    # Lower is better (deletion AUC): the same value is then better, not worse.
    assert not verdict(_jk(0.92 - half - 0.001), null, False, 0.05)["worse"]
    # The images' standard error of the contrast is reported, not added: the seeds' spread holds it.
    noisy = verdict(_jk(0.92 - half - 0.001, spread=0.02), null, True, 0.05)
    assert noisy["se_images"] > 0 and noisy["bound"] == below["bound"] and noisy["worse"]
    # Seeds that agree exactly give no spread to judge by.
    assert not verdict(_jk(0.5), Null(seeds[:1] * 3, seeds[:1] * 3, 3), True, 0.05)["testable"]


def test_comparison_rule_centres_on_the_reference_pairs_and_needs_two_pairs():
    with_reference = [_jk(0.80), _jk(0.82)]
    others = [_jk(0.90)]
    v = verdict(_jk(0.70), Null(with_reference, with_reference + others, 3), True, 0.05)
    assert v["centre"] == pytest.approx(0.81)
    assert v["spread"] == pytest.approx(float(np.std([0.80, 0.82, 0.90], ddof=1)))
    one_pair = verdict(_jk(0.10), Null([_jk(0.8)], [_jk(0.8)], 2), True, 0.05)
    assert not one_pair["testable"] and not one_pair["worse"]


def test_rule_holds_its_false_positive_rate_when_the_variant_is_one_more_seed():
    rng = np.random.default_rng(0)
    for k in (3, 5):
        flags = []
        for _ in range(4000):
            values = [_jk(v) for v in rng.normal(0, 1, k + 1)]
            flags.append(verdict(values[k], Null(values[:k], values[:k], k), True, 0.05)["worse"])
        assert 0.04 <= np.mean(flags) <= 0.06, (k, np.mean(flags))


def test_fixed_sequence_starts_at_the_harshest_level_and_stops_at_the_first_level_not_worse():
    levels = ["int8", "w4a8", "int4", "int3", "int2"]
    assert fixed_sequence(levels, {"int3": True, "int2": True}) == ("int3", ["int2", "int3", "int4"])
    # A flag at int4 alone is not reached: int2 is tested first and is not worse.
    assert fixed_sequence(levels, {"int4": True}) == (None, ["int2"])
    assert fixed_sequence(levels, dict.fromkeys(levels, True)) == ("int8", levels[::-1])


def _constructed(damaged: float | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP32 right on 90% of 100 images per class; the variant loses 8% of every class's right
    answers, and ``damaged`` of class 3's on top."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), 100)
    right_ref = rng.random(1000) < 0.9
    right = right_ref & (rng.random(1000) > 0.08)
    if damaged:
        right &= ~((labels == 3) & (rng.random(1000) < damaged))
    return labels, right_ref, right


def test_an_even_drop_over_all_classes_flags_no_class():
    for seed in range(5):
        labels, right_ref, right = _constructed(None, seed)
        rows = per_class(labels, right_ref, right, 10)
        assert (right_ref.mean() - right.mean()) > 0.05  # the model as a whole did lose accuracy
        assert [r["class"] for r in rows if r["hurt_more"]] == [], seed


def test_one_class_damaged_beyond_the_rest_is_flagged_alone():
    labels, right_ref, right = _constructed(0.4)
    rows = per_class(labels, right_ref, right, 10)
    assert [r["class"] for r in rows if r["hurt_more"]] == [3]
    assert rows[3]["beyond_rest"] < -0.25 and rows[3]["p_holm"] < 1e-6
    for r in rows:
        assert r["change"]["low"] <= r["change"]["value"] <= r["change"]["high"]


def test_exact_conditional_test_matches_enumerating_every_draw():
    # 3 classes' worth of changes: 2 of -1, 1 of +1, 5 zeros; the class holds 3 images (-1, -1, 0).
    changes = [-1, -1, 1, 0, 0, 0, 0, 0]
    observed = -2
    sums = [sum(c) for c in itertools.combinations(changes, 3)]
    expected = (sum(s < observed for s in sums) + 0.5 * sum(s == observed for s in sums)) / len(sums)
    assert relative_change_p(hurt=2, helped=0, n=3, hurt_rest=0, helped_rest=1, n_rest=5) == pytest.approx(expected)


def test_detectable_drop_of_25_images_per_class():
    # Ten classes of 25 images, the other classes unchanged: the fewest losses Holm's first step flags.
    k = detectable_loss(25, hurt_rest=0, helped_rest=0, n_rest=225, alpha=0.05, tests=10)
    assert k is not None and 2 <= k <= 12
    assert 10 * relative_change_p(k, 0, 25, 0, 0, 225) < 0.05 <= 10 * relative_change_p(k - 1, 0, 25, 0, 0, 225)


def test_holm_leaves_untestable_classes_out():
    assert holm([0.01, 0.04, 0.3]) == pytest.approx([0.03, 0.08, 0.3])
    adjusted = holm([0.01, math.nan, 0.04])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    e = paired_difference(hurt=0, helped=0, n=50, confidence=0.95)
    assert e.value == 0 and e.low < 0 < e.high


def test_bias_correction_removes_a_bias_that_falls_as_one_over_n():
    # The plug-in variance is biased by -sigma^2 / n; with equal groups of one image the corrected
    # value is exactly the unbiased sample variance, and with unequal groups it stays unbiased.
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, 60)

    def plug_in(values):
        return np.mean(values ** 2) - np.mean(values) ** 2

    ones = Jackknife(plug_in(x), [plug_in(np.delete(x, i)) for i in range(60)], 60)
    assert float(ones.bias_corrected().value) == pytest.approx(np.var(x, ddof=1), rel=1e-10)
    sizes = np.array([3, 5, 7, 9, 11, 25])
    edges = np.cumsum(sizes)[:-1]
    corrected = []
    for _ in range(4000):
        x = rng.normal(0, 2, 60)
        parts = np.split(x, edges)
        jk = Jackknife(plug_in(x), [plug_in(np.concatenate(parts[:g] + parts[g + 1:])) for g in range(6)], 60)
        corrected.append(float(jk.bias_corrected(sizes).value))
    assert np.mean(corrected) == pytest.approx(4.0, abs=0.05)  # the plug-in's mean would be 4 * 59/60


def test_cka_defaults_to_the_debiased_estimator_and_keeps_the_biased_one_by_name():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 512)), rng.normal(size=(64, 512))  # unrelated, many features
    assert abs(cka(x, y)) < 0.05
    assert cka(x, y, estimator="biased") > 0.5


def _similarity(diagonal: list[float], spread: float = 0.0) -> LayerSimilarity:
    values = np.diag(diagonal) + 0.1 * (1 - np.eye(len(diagonal)))
    offsets = np.linspace(-1, 1, 10)[:, None, None] * spread
    return LayerSimilarity("cka", ("l1", "l2"), ("l1", "l2"), values, values, values, 100, "jackknife", 0.95, 10,
                           values[None] + offsets)


def test_space_reading_uses_the_study_rule_and_survives_a_json_round_trip():
    fp32_seed1, fp32_seed2, seed1_seed2 = _similarity([0.90, 0.80]), _similarity([0.92, 0.82]), _similarity([0.91, 0.78])
    variant = _similarity([0.93, 0.50], spread=0.001)
    again = LayerSimilarity.from_dict(json.loads(json.dumps(variant.to_dict())))
    assert np.array_equal(again.leave_out, variant.leave_out) and np.array_equal(again.values, variant.values)
    reading = layer_reading(again, [fp32_seed1, fp32_seed2], [fp32_seed1, fp32_seed2, seed1_seed2], 3, 0.05)
    assert reading.worse == ["l2"] and reading.better == []
    expected = verdict(Jackknife(0.5, variant.leave_out[:, 1, 1], 100),
                       Null([_jk(0.80), _jk(0.82)], [_jk(0.80), _jk(0.82), _jk(0.78)], 3), True, 0.05)
    assert reading.verdicts[1]["bound"] == expected["bound"]
    two_seeds = layer_reading(again, [fp32_seed1], [fp32_seed1], 2, 0.05)
    assert not two_seeds.testable and two_seeds.worse == []


def test_study_imports_nothing_from_the_space():
    for path in (REPO / "study").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "space" or n.startswith("space.") for n in names), (path.name, names)
    code = ("import sys, study, study.__main__, study.page, study.gather, study.collect\n"
            "print(sorted(m for m in sys.modules if m == 'space' or m.startswith('space.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_grouped_mean_contrast_has_the_images_standard_error():
    rng = np.random.default_rng(3)
    a, b = rng.random(200), rng.random(200)
    groups = np.arange(200) % 20
    contrast = grouped_mean(a, groups) - grouped_mean(b, groups)
    assert float(contrast.standard_error()) == pytest.approx(np.std(a - b, ddof=1) / math.sqrt(200), rel=0.35)


def test_the_space_reading_states_the_study_verdict_with_two_controls():
    from space.session import _reading

    family = get_family("resnet18-shapes")
    pairs = {"int8": _similarity([0.93, 0.50], spread=0.001), "fp32-seed1": _similarity([0.90, 0.80]),
             "fp32-seed2": _similarity([0.92, 0.82])}
    text = _reading(pairs, ["fp32-seed1", "fp32-seed2"], [_similarity([0.91, 0.78])], family)
    assert "FP32 seeds: fp32, fp32-seed1, fp32-seed2." in text and "false-positive rate 5% per metric" in text
    assert "- int8 is further from FP32 than retraining at 1 of 2 layers (`l2`)" in text
    one_control = _reading({k: pairs[k] for k in ("int8", "fp32-seed1")}, ["fp32-seed1"], [], family)
    assert "No verdict: the rule needs at least 3 FP32 seeds" in one_control and "further" not in one_control
