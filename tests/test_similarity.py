"""CKA, SVCCA/PWCCA, agreement scores and bootstrap intervals: the properties the papers state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import surgery
from surgery.architectures import architecture_of
from surgery.similarity import (MinibatchCKA, canonical_correlations, cka, layer_similarity, map_spearman,
                                mean_ci, output_divergence, prediction_agreement, pwcca, svcca, topk_iou,
                                topk_overlap)
from surgery.similarity.cca import MomentAccumulator, cca_scores, moments
from surgery.similarity.stats import Estimate, bootstrap, grouped_mean, jackknife, jackknife_interval
from surgery.similarity.synthetic import SyntheticPair


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two related representations of 1024 examples: y is a noisy nonlinear function of x."""
    g = _gen(0)
    x = torch.randn(1024, 64, generator=g)
    y = torch.relu(x @ torch.randn(64, 256, generator=g)) + torch.randn(1024, 256, generator=g)
    return x, y


def _song_unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (2012), eq. 5, written out on raw (uncentred) Gram matrices."""
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=k.dtype)
    value = (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ k @ l @ one))
    return float(value) / (n * (n - 3))


def test_cka_of_a_representation_with_itself_is_one(pair):
    x, y = pair
    for estimator in ("biased", "debiased"):
        assert cka(x, x, estimator) == pytest.approx(1.0, abs=1e-12)
        assert cka(y, y, estimator) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling_not_to_invertible_maps(pair):
    x, y = pair
    reference = cka(x, y)
    q_x = torch.linalg.qr(torch.randn(64, 64, generator=_gen(1)))[0]
    q_y = torch.linalg.qr(torch.randn(256, 256, generator=_gen(2)))[0]
    assert cka(x @ q_x, y @ q_y) == pytest.approx(reference, abs=1e-6)
    assert cka(3.7 * x, 0.01 * y) == pytest.approx(reference, abs=1e-9)
    # An invertible but anisotropic map (condition number 1e3) changes what CKA sees.
    stretch = torch.diag(torch.logspace(0, 3, 64)) @ torch.randn(64, 64, generator=_gen(3))
    assert torch.linalg.matrix_rank(stretch) == 64
    assert abs(cka(x @ stretch, y) - reference) > 0.1
    assert cka(x, x @ stretch) < 0.9


def test_cka_shortcuts_match_the_textbook_estimators(pair):
    x, y = (t.double() for t in pair)
    x, y = x[:200], y[:200] + 5.0  # an offset: the estimator must centre by itself
    h = torch.eye(200, dtype=torch.float64) - 1 / 200
    k, l = x @ x.T, y @ y.T
    biased = torch.trace(k @ h @ l @ h) / torch.sqrt(torch.trace(k @ h @ k @ h) * torch.trace(l @ h @ l @ h))
    assert cka(x, y, estimator="biased") == pytest.approx(float(biased), rel=1e-9)
    unbiased = _song_unbiased_hsic(k, l) / math.sqrt(_song_unbiased_hsic(k, k) * _song_unbiased_hsic(l, l))
    assert cka(x, y) == pytest.approx(unbiased, rel=1e-9)  # the default is the debiased estimator


def test_minibatch_cka_converges_to_full_cka_as_batches_grow(pair):
    x, y = pair
    full = cka(x, y)
    errors = []
    for batch in (8, 64, 512):
        deviations = []
        for shuffle in range(8):
            order = torch.randperm(len(x), generator=_gen(100 + shuffle))
            acc = MinibatchCKA()
            for idx in order.split(batch):
                acc.update(x[idx], y[idx])
            deviations.append(abs(float(acc.compute()) - full))
        errors.append(float(np.mean(deviations)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    one_batch = MinibatchCKA()
    one_batch.update(x, y)
    assert float(one_batch.compute()) == pytest.approx(full, abs=1e-10)
    # The biased estimator on small batches is far off: the reason for the unbiased HSIC.
    biased_small = np.mean([cka(x[i], y[i], estimator="biased") for i in torch.arange(len(x)).split(8)])
    assert abs(biased_small - full) > 5 * errors[0]


def test_minibatch_cka_layer_matrix_and_interval(pair):
    x, y = pair
    acc = MinibatchCKA()
    for idx in torch.arange(len(x)).split(64):
        acc.update([x[idx], y[idx]], [y[idx], x[idx], torch.randn(len(idx), 16, generator=_gen(int(idx[0])))])
    values = acc.compute()
    assert values.shape == (2, 3)
    assert values[0, 1] == pytest.approx(1.0) and values[1, 0] == pytest.approx(1.0)
    assert values[0, 0] == pytest.approx(values[1, 1])  # CKA is symmetric
    assert abs(float(values[0, 2])) < 0.05  # independent noise
    jk = acc.jackknife()
    low, high = (torch.from_numpy(b) for b in jk.interval())
    assert jk.groups == 16 and np.allclose(jk.value, values.numpy())
    assert torch.all(low <= values + 1e-12) and torch.all(values <= high + 1e-12)
    assert float(high[0, 0] - low[0, 0]) > 0
    # Leaving out group g recomputes the CKA on the other batches exactly.
    direct = MinibatchCKA()
    for k, idx in enumerate(torch.arange(len(x)).split(64)):
        if k % 4 != 1:
            direct.update(x[idx], y[idx])
    assert acc.jackknife(groups=4).leave_out[1, 0, 0] == pytest.approx(float(direct.compute()), abs=1e-12)
    assert acc.num_batches == 16 and acc.num_examples == 1024


def test_minibatch_cka_rejects_bad_batches():
    acc = MinibatchCKA()
    with pytest.raises(ValueError, match="at least 4 images"):
        acc.update(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="same images"):
        acc.update(torch.randn(8, 5), torch.randn(9, 5))
    with pytest.raises(ValueError, match="no minibatch"):
        acc.compute()
    with pytest.raises(ValueError, match="same examples"):
        cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="NaN"):
        cka(torch.full((10, 3), math.nan), torch.randn(10, 3))
    with pytest.raises(ValueError, match="unknown CKA estimator"):
        cka(torch.randn(10, 3), torch.randn(10, 3), estimator="unbiased")


def test_svcca_and_pwcca_sanity():
    g = _gen(5)
    f64 = dict(generator=g, dtype=torch.float64)  # exact invariances need inputs without float32 rounding
    x = torch.randn(3000, 20, **f64)
    a, b = torch.randn(20, 20, **f64), torch.randn(20, 20, **f64)
    assert svcca(x, x) == pytest.approx(1.0, abs=1e-9)
    assert pwcca(x, x) == pytest.approx(1.0, abs=1e-9)
    # CCA sees through any invertible linear map of either side.
    related = torch.tanh(x[:, :10]) @ torch.randn(10, 15, **f64) + 0.5 * torch.randn(3000, 15, **f64)
    plain = svcca(x, related, keep=None)
    assert 0.2 < plain < 0.95
    assert svcca(x @ a, related @ b[:15, :15], keep=None) == pytest.approx(plain, abs=1e-8)
    assert pwcca(x, related @ b[:15, :15]) == pytest.approx(pwcca(x, related), abs=1e-8)
    assert svcca(x, x @ a, keep=None) == pytest.approx(1.0, abs=1e-8)
    # Independent representations: low, at the level CCA's overfitting on 3000 examples allows.
    noise = torch.randn(3000, 20, **f64)
    assert svcca(x, noise) < 0.1
    assert pwcca(x, noise) < 0.1
    rho = canonical_correlations(x, related)
    assert rho.shape == (15,) and torch.all(rho[:-1] >= rho[1:])


def test_pwcca_variance_weights_are_the_variance_of_x_along_each_canonical_variate():
    # Diagonal covariances: canonical variate i is x_i / s_i, along which x has variance s_i^2.
    model = SyntheticPair()
    x, y = (t.reshape(-1, 4) for t in model.sample(5000, seed=0))
    m = moments(x, y)
    scores = {w: cca_scores(m, ("pwcca",), pwcca_weights=w)["pwcca"] for w in ("l1", "variance")}
    s = np.array(model.scales)
    assert scores["l1"] == pytest.approx(pwcca(x, y), abs=1e-12)  # Morcos et al.'s, the default
    assert scores["l1"] == pytest.approx(model.pwcca, abs=0.01)
    assert scores["variance"] == pytest.approx((s ** 2 * model.rho).sum() / (s ** 2).sum(), abs=0.01)
    # Unlike the L1 weights, the variance of x along a direction does not move under an orthogonal map of x.
    rotated = x @ torch.linalg.qr(torch.randn(4, 4, generator=_gen(7), dtype=torch.float64))[0]
    assert cca_scores(moments(rotated, y), ("pwcca",), pwcca_weights="variance")["pwcca"] == \
        pytest.approx(scores["variance"], abs=1e-9)
    with pytest.raises(ValueError, match="unknown PWCCA weights"):
        cca_scores(m, ("pwcca",), pwcca_weights="l2")


def test_svcca_keep_truncates_to_the_top_directions():
    g = _gen(6)
    signal = torch.randn(2000, 3, generator=g)
    x = torch.cat([10 * signal, 0.01 * torch.randn(2000, 17, generator=g)], 1)
    # y: the same 3-d signal, mixed, plus 17 faint directions of its own noise.
    y = torch.cat([signal @ torch.randn(3, 3, generator=g), 0.01 * torch.randn(2000, 17, generator=g)], 1)
    assert len(canonical_correlations(x, y, keep=0.99)) == 3  # 99% of x's variance lies in 3 directions
    assert svcca(x, y, keep=0.99) == pytest.approx(1.0, abs=1e-6)
    assert svcca(x, y, keep=None) < 0.3  # without truncation the 17 noise directions dilute the mean
    assert len(canonical_correlations(x, y, keep=2)) == 2
    with pytest.raises(ValueError, match="no variance"):
        svcca(torch.ones(100, 4), y[:100])
    with pytest.raises(ValueError, match="fraction"):
        svcca(x, y, keep=1.5)


def test_streamed_moments_equal_the_moments_of_the_rows_and_leave_groups_out():
    g = _gen(9)
    x = torch.rand(40, 16, 8, generator=g, dtype=torch.float64) * 3 + 5  # ReLU-like: large mean
    y = torch.rand(40, 16, 6, generator=g, dtype=torch.float64)
    acc = MomentAccumulator(groups=4)
    for k, (xb, yb) in enumerate(zip(x.split(5), y.split(5))):
        acc.update(xb.reshape(-1, 8), yb.reshape(-1, 6), k % 4, len(xb))
    for a, b in zip(acc.moments(), moments(x.reshape(-1, 8), y.reshape(-1, 6))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-9)
    kept = torch.cat([xb for k, xb in enumerate(x.split(5)) if k % 4 != 2]), \
        torch.cat([yb for k, yb in enumerate(y.split(5)) if k % 4 != 2])
    for a, b in zip(acc.moments(leave_out=2), moments(kept[0].reshape(-1, 8), kept[1].reshape(-1, 6))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-9)
    jk = acc.jackknife()
    assert acc.images == 40 and jk["svcca"].groups == 4
    direct = cca_scores(moments(kept[0].reshape(-1, 8), kept[1].reshape(-1, 6)))
    assert jk["pwcca"].leave_out[2] == pytest.approx(direct["pwcca"], abs=1e-9)


def test_jackknife_intervals_contain_their_estimate_and_match_the_t_interval_of_a_mean():
    values = np.random.default_rng(3).normal(1.0, 2.0, size=400)
    # One image per group: the jackknife of a mean is exactly the t interval.
    e = grouped_mean(values, np.arange(400)).estimate()
    half = 1.9659 * values.std(ddof=1) / math.sqrt(400)  # t_{399, 0.975}
    assert e.value == pytest.approx(values.mean()) and e.high - e.value == pytest.approx(half, rel=1e-3)
    assert e.method == "jackknife" and e.replicates == 400
    grouped = grouped_mean(values, 20).estimate()
    assert grouped.low < grouped.value < grouped.high and grouped.replicates == 20
    # A fitted, non-linear statistic: the interval is centred on the full-sample value.
    jk = jackknife(lambda i: np.log(values[i].var()), np.arange(400) % 10)
    low, high = jackknife_interval(jk.value, jk.leave_out)
    assert low < np.log(values.var()) < high and (high + low) / 2 == pytest.approx(np.log(values.var()))
    # Contrasts of statistics on the same groups are jackknives too.
    diff = (grouped_mean(values, 20) - grouped_mean(values * 0.5, 20)).estimate()
    assert diff.value == pytest.approx(values.mean() / 2)
    with pytest.raises(AssertionError, match="does not contain"):
        Estimate(1.0, 0.0, 0.5, 10)


def test_bootstrap_intervals_cover_and_shrink_with_more_images():
    g = np.random.default_rng(0)
    small, large = g.normal(0.5, 1.0, size=50), g.normal(0.5, 1.0, size=2000)
    e_small, e_large = mean_ci(small, seed=1), mean_ci(large, seed=1)
    for e, data in ((e_small, small), (e_large, large)):
        assert e.low < data.mean() < e.high
        assert e.value == pytest.approx(data.mean())
    assert (e_large.high - e_large.low) < 0.3 * (e_small.high - e_small.low)
    # The standard error of a mean: a 95% interval spans about 2 * 1.96 * sd / sqrt(n).
    assert e_large.high - e_large.low == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.15)
    assert mean_ci(small, seed=1) == e_small  # same seed, same interval
    nan_aware = mean_ci(np.array([1.0, math.nan, 0.0, 1.0]), n_boot=200)
    assert nan_aware.n == 3 and nan_aware.value == pytest.approx(2 / 3)
    low, high = bootstrap(lambda i: np.array([small[i].mean(), small[i].max()]), len(small), seed=1)
    assert low.shape == (2,) and low[0] == pytest.approx(e_small.low, abs=0.05)


def test_output_divergence_is_kl_and_sees_what_agreement_does_not():
    g = _gen(8)
    logits = torch.randn(100, 10, generator=g)
    assert torch.allclose(output_divergence(logits, logits + 3.0), torch.zeros(100, dtype=torch.float64), atol=1e-12)
    other = torch.randn(100, 10, generator=g)
    expected = torch.nn.functional.kl_div(other.double().log_softmax(1), logits.double().log_softmax(1),
                                          log_target=True, reduction="none").sum(1)
    assert torch.allclose(output_divergence(logits, other), expected) and bool((expected > 0).all())
    sharper = 3 * logits  # the same top-1 class everywhere, other confidences
    assert prediction_agreement(logits, sharper).mean() == 1.0 and bool((output_divergence(logits, sharper) > 0).all())


def test_agreement_scores():
    g = _gen(7)
    logits = torch.randn(100, 10, generator=g)
    assert prediction_agreement(logits, logits).mean() == 1.0
    shuffled = logits[:, torch.randperm(10, generator=g)]
    assert prediction_agreement(logits, shuffled).mean() < 0.5
    assert topk_overlap(logits, logits + 1.0, k=5).mean() == 1.0
    assert torch.all(topk_overlap(logits, -logits, k=5) == 0.0)  # top 5 vs bottom 5 of 10
    maps = torch.rand(20, 16, 16, generator=g)
    assert torch.allclose(map_spearman(maps, maps ** 3), torch.ones(20, dtype=torch.float64))  # monotone: 1
    assert torch.allclose(map_spearman(maps, -maps), -torch.ones(20, dtype=torch.float64))
    relu_like = (maps - 0.5).clamp(min=0)  # half the pixels tie at zero, as after GradCAM's ReLU
    assert torch.allclose(map_spearman(relu_like, relu_like), torch.ones(20, dtype=torch.float64))
    assert torch.allclose(topk_iou(maps, maps * 2, 0.1), torch.ones(20, dtype=torch.float64))
    disjoint = topk_iou(maps, -maps, 0.1)
    assert torch.all(disjoint == 0)
    constant = torch.zeros(20, 16, 16)
    assert torch.isnan(map_spearman(maps, constant)).all() and torch.isnan(topk_iou(constant, maps)).all()
    with pytest.raises(ValueError, match="differ in shape"):
        map_spearman(maps, maps[:, :8])


def test_layer_similarity_on_fp32_int8_and_sparse_models(tiny_zoo):
    fp32 = surgery.load_variant(tiny_zoo / "fp32").model
    images = torch.rand(24, 3, 64, 64, generator=_gen(8))
    batches = images.split(8)
    layers = ["layer4", "fc"]
    same = layer_similarity(fp32, fp32, batches, layers)
    assert np.allclose(np.diag(same.values), 1.0, atol=1e-9)
    assert same.num_images == 24 and same.values.shape == (2, 2)
    for name in ("int8", "sparse90"):
        other = surgery.load_variant(tiny_zoo / name).model
        sim = layer_similarity(fp32, other, batches, layers)
        assert np.isfinite(sim.values).all()
        assert (sim.low <= sim.values + 1e-9).all() and (sim.values <= sim.high + 1e-9).all()
        assert sim.to_dict()["layers_b"] == layers
    both = layer_similarity(fp32, fp32, batches, ["layer2", "layer3"], method=("svcca", "pwcca"),
                            pairs="diagonal")
    for method, sim in both.items():
        assert np.allclose(np.diag(sim.values), 1.0, atol=1e-6), method
        assert np.isnan(sim.values[0, 1]) and "positions" in sim.resampling
    pooled = layer_similarity(fp32, fp32, batches, ["layer2"], method="svcca", reduce="pool")
    assert pooled.values[0, 0] == pytest.approx(1.0, abs=1e-6) and pooled.groups == 3
    assert architecture_of(fp32).blocks == ("layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                            "layer3.0", "layer3.1", "layer4.0", "layer4.1")
    with pytest.raises(ValueError, match="no submodule"):
        layer_similarity(fp32, fp32, batches, ["layer9"])
    with pytest.raises(ValueError, match="unknown similarity method"):
        layer_similarity(fp32, fp32, batches, layers, method="rsa")
