"""The shards of one study, checked to agree, and every statistic read from them as a jackknife.

Every statistic is a :class:`surgery.similarity.Jackknife` over the same ``G`` groups of images
(batch ``k`` in group ``k % G``), so contrasts between variants on the same images get their
own intervals. SVCCA and PWCCA come back only for blocks with at least
:data:`surgery.similarity.cca.ROWS_PER_DIRECTION_FLOOR` effective rows per direction; SVCCA
and PWCCA bias-corrected (:meth:`Jackknife.bias_corrected`).

Example:
    >>> study = Study([Shard.load(p) for p in find_shards([Path("shards")])])
    >>> study.comparison("int4", "fp32", "svcca.layer4.1").estimate()
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from study.shard import Shard
from study.zoo import REFERENCE
from surgery.registry import get_family
from surgery.similarity import Jackknife, MinibatchCKA, cca, group_of, grouped_mean
from surgery.similarity.cca import CCA_METHODS, CORRECTION_ERROR
from surgery.variants import parse_variant, sort_variants

MAP_METHODS = ("gradcam", "saliency")
REPRESENTATIONS = ("cka",) + CCA_METHODS


class Study:
    """The shards of one study, checked to share settings and images."""

    def __init__(self, shards: list[Shard]) -> None:
        if not shards:
            raise ValueError("no shards to gather")
        first = shards[0].meta
        for sh in shards:
            for key in ("settings_digest", "images_digest", "family"):
                if sh.meta[key] != first[key]:
                    raise ValueError(f"shard {sh.name} was measured with other {key.split('_')[0]} than "
                                     f"{shards[0].name}: collect every shard with the same settings")
        names = sort_variants({sh.name for sh in shards})
        self.shards = {n: next(sh for sh in shards if sh.name == n) for n in names}
        if REFERENCE not in self.shards:
            raise ValueError(f"no {REFERENCE} shard among {', '.join(names)}")
        self.settings = first["settings"]
        self.n = first["images"]
        self.blocks = first["blocks"]
        family = get_family(first["family"])
        self.num_classes = family.num_classes
        self.G = self.settings["groups"]
        self.batch = self.settings["batch_size"]
        self.groups = group_of(np.arange(self.n), self.G, self.batch)
        self.group_sizes = np.bincount(self.groups, minlength=self.G).astype(np.float64)
        # Seeds of the family's own recipe: another recipe's run (fp32-recipe<k>) is not a draw of the null.
        self.seeds = [n for n in names if parse_variant(n).kind == "fp32" and not parse_variant(n).is_recipe_control]
        self.compressed = [n for n in names if parse_variant(n).kind != "fp32"]
        # A pretrained FP32 used as it is has no seeds: there is no null, and no variant is said to
        # differ from retraining.
        self.no_null = None if family.has_fp32_seeds else (
            f"The FP32 model of {family.name} is torchvision's pretrained {family.pretrained}, used as it is: it has "
            "no seeds (another recipe's run, fp32-recipe<k>, is not a seed of this one), so there is no null and no "
            "variant is said to differ from retraining.")
        for sh in shards:
            for ref in sh.meta["references"]:
                if ref in self.shards and sh.meta["reference_sha256"][ref] != self.shards[ref].meta["weights_sha256"]:
                    raise ValueError(f"shard {sh.name} compared with other {ref} weights than the {ref} shard")

    @property
    def confidence(self) -> float:
        return self.settings["confidence"]

    def single(self, name: str, metric: str) -> Jackknife | None:
        """A model's own metric (``top1``, ``gradcam.pointing_game``...), or None where not measured."""
        a = self.shards[name].arrays
        key = "correct" if metric == "top1" else metric
        if key not in a:
            return None
        if key.endswith(("deletion_auc", "insertion_auc")):
            positions = a["deletion.position"].astype(int)
            return grouped_mean(a[key], self.groups[positions])
        return grouped_mean(a[key], self.groups)

    def comparison_keys(self, name: str, ref: str) -> list[str]:
        """The comparisons of ``name`` with ``ref``: per-image scores, then each representation per block."""
        a = self.shards[name].arrays
        prefix = f"{ref}."
        per_image = sorted(k[len(prefix):] for k in a if k.startswith(prefix) and a[k].ndim == 1
                           and a[k].shape[0] == self.n and k[len(prefix):].split(".")[0] not in
                           (*REPRESENTATIONS, "cca", "match"))
        return per_image + [f"{m}.{b}" for m in REPRESENTATIONS for b in self.blocks]

    def comparison(self, name: str, ref: str, metric: str, shuffled: bool = False) -> Jackknife | None:
        """``metric`` of ``name`` against ``ref`` (a per-image score, or ``cka.<block>`` etc.).

        SVCCA/PWCCA: None below the floor of effective rows per direction; bias-corrected;
        ``shuffled``: the shuffled-images baseline instead.
        """
        a = self.shards[name].arrays
        if ref not in self.shards[name].meta["references"]:
            return None
        method, _, block = metric.partition(".")
        if method in REPRESENTATIONS and block in self.blocks:
            i = self.blocks.index(block)
            if method == "cka":
                acc = self._cka(name, ref)
                return acc[i, i] if acc is not None else None
            if not self.cca_reported(name, ref, i):
                return None
            key = f"{ref}.{method}.shuffled" if shuffled else f"{ref}.{method}"
            raw = Jackknife(a[f"{key}.value"][i], a[f"{key}.leave_out"][:, i], self.n)
            # SVCCA's and the study's PWCCA's overfitting bias (variance weights on SVCCA's subspaces,
            # study.collect.PWCCA_WEIGHTS) falls as 1 / rows and the jackknife removes it; the interval allows
            # for the correction's own error (tests/test_cca_bias.py). Morcos et al.'s L1 weights carry a
            # bias that does not fall as 1 / rows (surgery.similarity.cca).
            return raw.bias_corrected(self.group_sizes[: raw.groups], CORRECTION_ERROR[method])
        key = f"{ref}.{metric}"
        return grouped_mean(a[key], self.groups) if key in a else None

    def plug_in(self, name: str, ref: str, metric: str, shuffled: bool = False) -> float | None:
        """SVCCA/PWCCA before the bias correction (what the overfitting inflates)."""
        method, _, block = metric.partition(".")
        key = f"{ref}.{method}.shuffled.value" if shuffled else f"{ref}.{method}.value"
        a = self.shards[name].arrays
        return float(a[key][self.blocks.index(block)]) if key in a else None

    def cca_rows(self, name: str, ref: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Per block of the CCA: rows, the smaller side's channels (the canonical directions) and the
        design effect of correlated positions (None where CCA was not computed)."""
        a = self.shards[name].arrays
        if f"{ref}.cca.rows" not in a:
            return None
        return a[f"{ref}.cca.rows"], a[f"{ref}.cca.dims"].min(1), a[f"{ref}.cca.design_effect"]

    def cca_reported(self, name: str, ref: str, block: int) -> bool:
        """Whether the block has at least the floor of effective rows (rows / design effect) per direction."""
        found = self.cca_rows(name, ref)
        if found is None:
            return False
        rows, directions, design = (v[block] for v in found)
        return rows / design >= cca.ROWS_PER_DIRECTION_FLOOR * directions

    def kept(self, name: str, ref: str, method: str, block: str) -> list[int] | None:
        """Directions each side kept (fixed from all images) for ``method`` at ``block``."""
        key = f"{ref}.{method}.kept"
        a = self.shards[name].arrays
        return [int(k) for k in a[key][self.blocks.index(block)]] if key in a else None

    def pair(self, a: str, b: str, metric: str) -> Jackknife | None:
        """``metric`` between two FP32 seeds, whichever of them was measured against the other."""
        found = self.comparison(b, a, metric)
        return found if found is not None else self.comparison(a, b, metric)

    def _cka(self, name: str, ref: str) -> Jackknife | None:
        a = self.shards[name].arrays
        if f"{ref}.cka.cross" not in a:
            return None
        acc = MinibatchCKA.from_batch_values(a[f"{ref}.cka.cross"], a[f"{ref}.cka.self_x"], a[f"{ref}.cka.self_y"],
                                             int(a[f"{ref}.cka.images"]))
        return acc.jackknife(self.G)

    def cka_matrix(self, name: str, ref: str) -> np.ndarray | None:
        """Block x block CKA of ``ref`` (rows) against ``name`` (columns)."""
        jk = self._cka(name, ref)
        return None if jk is None else jk.value

    def seed_pairs(self, seeds: list[str] | None = None) -> list[tuple[str, str]]:
        """Every FP32-vs-FP32 pair measured among ``seeds`` (default all), as ``(earlier, later)``."""
        seeds = self.seeds if seeds is None else seeds
        return [(a, b) for a, b in combinations(seeds, 2) if a in self.shards[b].meta["references"]]
