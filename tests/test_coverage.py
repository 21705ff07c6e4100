"""Do the 95% intervals cover the population value 95% of the time? On data where it is known.

:class:`surgery.similarity.synthetic.SyntheticPair` has closed-form population values of linear
CKA, SVCCA and PWCCA; each replication draws new images, streams them in batches as the study
does (minibatch CKA over the batches, CCA moments per jackknife group) and checks whether the
jackknife interval holds the population value. 200 replications of 160 images (4 positions
each, correlated within an image); ``bench/bench_coverage.py`` runs more, with more images, and
next to the percentile bootstrap this replaced.
"""

from __future__ import annotations

import numpy as np

from surgery.similarity.cca import MomentAccumulator
from surgery.similarity.cka import MinibatchCKA
from surgery.similarity.synthetic import SyntheticPair

REPLICATIONS, IMAGES, BATCH, GROUPS = 200, 160, 8, 20


def _intervals(model: SyntheticPair, seed: int) -> dict[str, tuple[float, float]]:
    x, y = model.sample(IMAGES, seed)
    cca, cka = MomentAccumulator(GROUPS), MinibatchCKA()
    for k, (xb, yb) in enumerate(zip(x.split(BATCH), y.split(BATCH))):
        cca.update(xb.reshape(-1, xb.shape[2]), yb.reshape(-1, yb.shape[2]), k % GROUPS, len(xb))
        cka.update(xb.flatten(1), yb.flatten(1))
    jk = {**cca.jackknife(), "cka": cka.jackknife(GROUPS)}
    return {name: tuple(float(b) for b in j.interval(0.95)) for name, j in jk.items()}


def test_jackknife_intervals_cover_known_population_values_at_their_nominal_rate():
    model = SyntheticPair()
    assert model.svcca_keeps_all()  # so SVCCA's population value is the mean canonical correlation
    truth = {"cka": model.cka, "svcca": model.svcca, "pwcca": model.pwcca}
    hits = {name: 0 for name in truth}
    for seed in range(REPLICATIONS):
        for name, (low, high) in _intervals(model, seed).items():
            hits[name] += low <= truth[name] <= high
    coverage = {name: count / REPLICATIONS for name, count in hits.items()}
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage


def test_population_values_match_a_large_sample():
    """The closed forms are right: on 20,000 images the estimates sit on them."""
    model = SyntheticPair()
    x, y = model.sample(20000, seed=1)
    cca = MomentAccumulator()
    cca.update(x.reshape(-1, 4), y.reshape(-1, 4))
    scores = cca.jackknife()
    cka = MinibatchCKA()
    for xb, yb in zip(x.split(1000), y.split(1000)):
        cka.update(xb.flatten(1), yb.flatten(1))
    assert abs(float(scores["svcca"].value) - model.svcca) < 0.005
    assert abs(float(scores["pwcca"].value) - model.pwcca) < 0.005
    assert abs(float(cka.compute()) - model.cka) < 0.01
    assert np.all(np.diff(model.rho) < 0)  # distinct correlations: PWCCA weighs them differently
