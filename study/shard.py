"""A shard: everything the study measured on one variant, written so that another process can gather it.

``<variant>.json`` (what was measured, on which images, with which settings and weights) and
``<variant>.npz`` (numeric arrays only; read with ``allow_pickle=False``). The gathering step
checks that every shard of a study shares the settings and the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "study-shard/1"


@dataclass
class Shard:
    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta["variant"]

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        # Write under temporary names, then rename: a crash never leaves a half shard that looks whole.
        partial = directory / f"{self.name}.npz.partial"
        with open(partial, "wb") as f:
            np.savez(f, **self.arrays)
        partial.replace(directory / f"{self.name}.npz")
        meta = directory / f"{self.name}.json.partial"
        meta.write_text(json.dumps({"format": FORMAT, **self.meta}, indent=1, sort_keys=True) + "\n")
        meta.replace(directory / f"{self.name}.json")
        return directory / f"{self.name}.json"

    @classmethod
    def load(cls, path: Path) -> "Shard":
        path = Path(path)
        meta_path = path if path.suffix == ".json" else path.with_suffix(".json")
        if not meta_path.exists():
            raise FileNotFoundError(f"no study shard at {meta_path}")
        meta = json.loads(meta_path.read_text())
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{meta_path} is not a {FORMAT} file")
        with np.load(meta_path.with_suffix(".npz"), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(meta, arrays)


def find_shards(paths: list[Path]) -> list[Path]:
    """Shard files given as files or directories holding them."""
    found = []
    for p in map(Path, paths):
        found += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not found:
        raise FileNotFoundError(f"no study shards in {', '.join(map(str, paths))}")
    return found
