"""SVCCA in the study's regime: 512 channels, 8 rows per canonical direction, where plug-in CCA overfits.

:class:`surgery.similarity.synthetic.SpectrumPair` has closed-form population values. Each
replication streams 256 images of 16 positions (4,096 rows for 512 channels) into 16 jackknife
groups as the study does, fixes SVCCA's kept dimensions once from all rows, and checks whether
the bias-corrected estimate's interval holds the population value. The plug-in estimate is far
above it (and its interval almost never covers); shuffled images, which share no signal, give a
plug-in value near 0.25 that the correction pulls towards 0. ``bench/bench_coverage.py --regime
report`` runs more replications, PWCCA beside SVCCA, and rows correlated within an image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.similarity.cca import MomentAccumulator
from surgery.similarity.synthetic import SpectrumPair

REPLICATIONS, IMAGES, BATCH, GROUPS = 100, 256, 16, 16


def _replication(model: SpectrumPair, seed: int) -> dict[str, tuple[float, float, float]]:
    x, y = model.sample(IMAGES, seed)
    acc = MomentAccumulator(GROUPS)
    for k, (xb, yb) in enumerate(zip(x.split(BATCH), y.split(BATCH))):
        shifted = torch.cat([yb[-1:], yb[:-1]])
        acc.update(xb.reshape(-1, model.channels), yb.reshape(-1, model.channels), k % GROUPS, len(xb),
                   shifted.reshape(-1, model.channels))
    raw = acc.jackknife(("svcca",))["svcca"]
    truth = model.svcca(raw.extra["kept"])
    corrected = raw.bias_corrected(acc.group_rows)
    shuffled = acc.jackknife(("svcca",), shuffled=True)["svcca"] if seed < 10 else None
    return {"truth": truth, "raw": float(raw.value), "raw_interval": tuple(map(float, raw.interval())),
            "corrected": float(corrected.value), "interval": tuple(map(float, corrected.interval())),
            "shuffled": None if shuffled is None else (float(shuffled.value),
                                                       float(shuffled.bias_corrected(acc.group_rows).value))}


@pytest.fixture(scope="module")
def replications() -> list[dict]:
    model = SpectrumPair()
    assert model.channels == 512 and IMAGES * model.positions == 8 * model.channels
    return [_replication(model, seed) for seed in range(REPLICATIONS)]


@pytest.mark.xfail(reason="a known defect, issue 18 open: the bias-corrected interval covered 0.80 (not 0.90-0.99) "
                          "in CI on the 2-core Xeon with AVX-512 bf16 (2026-12-06)", strict=False)
def test_bias_corrected_svcca_interval_covers_at_512_channels_and_8_rows_per_direction(replications):
    covered = [low <= r["truth"] <= high for r in replications for low, high in [r["interval"]]]
    coverage = float(np.mean(covered))
    assert 0.90 <= coverage <= 0.99, coverage


def test_plug_in_svcca_overfits_there_and_the_correction_removes_it(replications):
    raw_bias = np.mean([r["raw"] - r["truth"] for r in replications])
    corrected_bias = np.mean([r["corrected"] - r["truth"] for r in replications])
    raw_cover = np.mean([low <= r["truth"] <= high for r in replications for low, high in [r["raw_interval"]]])
    assert raw_bias > 0.005 and raw_cover < 0.5
    assert abs(corrected_bias) < raw_bias / 5
    shuffled = [r["shuffled"] for r in replications if r["shuffled"] is not None]
    assert all(plug_in > 0.15 for plug_in, _ in shuffled)  # independent images still look correlated
    assert all(0 <= corrected < plug_in for plug_in, corrected in shuffled)
