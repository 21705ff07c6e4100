"""The compression study: at which level, in which layer and for which classes a compressed
network stops being the same network, measured against the noise of retraining FP32.

Built from ``surgery``'s functions; ``python -m study --zoo DIR --out DIR`` writes
``report.html`` and ``metrics.json`` (see :mod:`study.__main__`). Stages:

- :mod:`study.collect`: one variant against its references, streamed batch by batch -> a shard;
- :mod:`study.measurements`: the shards of one study, every statistic read as a jackknife;
- :mod:`study.null`: the rule that calls a variant worse than retraining (its false-positive
  rate stated and measured), fixed-sequence testing along an axis, the leave-one-seed-out check;
- :mod:`study.classes`: per-class damage (Hooker et al.);
- :mod:`study.gather`: shards -> the seed null, dose-response, per-class damage, layer
  diagnostics and the layer-matching check of the instruments (``metrics.json``);
- :mod:`study.page`: the self-contained HTML page and its figures (drawn from the shards alone).

``study`` imports nothing from the Space; the Space's Representations tab calls :mod:`study.null`.

Example:
    >>> from study import run_study, Settings
    >>> metrics = run_study("zoo/resnet18-shapes", "study-out", Settings(images=1000))
"""

from study.settings import Settings

__all__ = ["Settings", "run_study"]


def run_study(zoo, out, settings: Settings = Settings()) -> dict:
    """Collect every variant of ``zoo`` and write the study into ``out`` (see :mod:`study.__main__`)."""
    from study.__main__ import study_all

    return study_all(zoo, out, settings)
