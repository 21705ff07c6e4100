"""A zoo as the study sees it: the FP32 reference, its seed controls, and the compression ladder.

Variant names are read with :func:`surgery.variants.parse_variant` (any subset of the ladder;
compressed variants of other seeds, ``int8-seed1``, form a second arm of that level).

Example:
    >>> zoo = StudyZoo.open("zoo/resnet18-shapes")
    >>> zoo.seeds, zoo.levels["quantized"], zoo.levels["sparse"]
    (['fp32', 'fp32-seed1', 'fp32-seed2'], ['int8', 'int4'], ['sparse50', 'sparse90'])
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from surgery.checkpoint import CONFIG_FILE, read_config
from surgery.registry import ModelFamily, get_family
from surgery.variants import parse_variant, sort_variants

REFERENCE = "fp32"


@dataclass
class StudyZoo:
    """The variant directories of one family's zoo, classified (models are loaded on demand)."""

    root: Path
    family: ModelFamily
    configs: dict[str, dict] = field(repr=False)

    @classmethod
    def open(cls, root: Path | str) -> "StudyZoo":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"zoo directory {root} does not exist")
        configs = {}
        for d in root.iterdir():
            if (d / CONFIG_FILE).exists():
                try:
                    parse_variant(d.name)
                except ValueError:
                    continue  # not a zoo member (a report, a cache...)
                configs[d.name] = read_config(d)
        if REFERENCE not in configs:
            raise FileNotFoundError(f"{root}: no {REFERENCE} variant (expected {root / REFERENCE / CONFIG_FILE}); "
                                    "build one with `python -m training zoo --out DIR`")
        families = {c["family"] for c in configs.values()}
        if len(families) != 1:
            raise ValueError(f"{root}: variants of several families ({', '.join(sorted(families))}); give one family's zoo")
        return cls(root, get_family(families.pop()), {n: configs[n] for n in sort_variants(configs)})

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    @property
    def seeds(self) -> list[str]:
        """The FP32 models, reference first: the null of retraining noise."""
        return [n for n in self.names if parse_variant(n).kind == "fp32"]

    @property
    def compressed(self) -> list[str]:
        return [n for n in self.names if parse_variant(n).kind != "fp32"]

    @property
    def levels(self) -> dict[str, list[str]]:
        """Rungs of each compression axis, least compressed first (seed 0 names)."""
        rungs = sort_variants({parse_variant(n).base for n in self.compressed})
        return {"quantized": [n for n in rungs if parse_variant(n).kind == "quantized"],
                "sparse": [n for n in rungs if parse_variant(n).kind == "sparse"]}

    def arm(self, rung: str) -> list[str]:
        """Every seed of a rung present in the zoo (``fp32`` -> the FP32 seeds)."""
        return [n for n in self.names if parse_variant(n).base == rung]

    def references(self, name: str) -> list[str]:
        """What ``name`` is compared with: compressed variants with the FP32 model of their seed
        (FP32 itself where that seed's FP32 is absent); an FP32 seed with every earlier seed (the pairs)."""
        spec = parse_variant(name)
        if spec.kind == "fp32":
            return self.seeds[: self.seeds.index(name)]
        own = REFERENCE if spec.seed == 0 else f"{REFERENCE}-seed{spec.seed}"
        return [REFERENCE] + ([own] if own != REFERENCE and own in self.configs else [])

    def sha256(self, name: str) -> str:
        return self.configs[name]["weights"]["sha256"]

    def digest(self) -> str:
        """One hash of every member's weights: the key a cached study is found by."""
        text = "\n".join(f"{n} {self.sha256(n)}" for n in self.names)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
