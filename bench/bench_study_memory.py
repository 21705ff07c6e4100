"""Peak memory of the study against the number of held-out images: it should not grow with them.

Each size runs in a fresh process: ``study collect`` of one compressed variant (which also runs
its FP32 reference on every batch: maps, scores, CKA, CCA moments, diagnostics). The table gives
the process's peak resident set size (``resource.getrusage``, ``ru_maxrss``), the resident size
just before the stream starts (models loaded, held-out split built), and their difference: what
the study itself holds. Shapes generates its whole held-out split in memory first (about 49 KB an
image), which is the dataset's cost, not the study's: it is in the "before" column.

Usage:
    python bench/bench_study_memory.py --zoo ZOO [--variant int8] [--images 1000 10000] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(zoo: str, variant: str, images: int, batch: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    from study.collect import ModelCache, data_seed, collect_variant
    from study.images import held_out
    from study.settings import Settings
    from study.zoo import StudyZoo

    s = Settings(images=images, batch_size=batch, eval_samples=max(images, 1000))
    zoo_ = StudyZoo.open(zoo)
    data = held_out(zoo_.family, s, data_seed(zoo_))
    models = ModelCache(zoo_, "cpu")
    for name in [variant, *zoo_.references(variant)]:
        models(name)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    collect_variant(zoo_, variant, s, data, models).save(Path(out))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "peak_kb": peak, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", required=True)
    p.add_argument("--variant", default="int8")
    p.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.zoo, args.variant, args.images[0], args.batch, args.out)
        return
    print(f"study collect {args.variant} (+ its FP32 reference), batches of {args.batch}; peak RSS in MiB")
    print(f"{'images':>7} {'before stream':>14} {'peak':>8} {'study itself':>13} {'ratio to first':>15} {'seconds':>8}",
          flush=True)
    first = None
    for n in args.images:  # each row as it comes: the largest size takes the better part of an hour on 2 cores
        with tempfile.TemporaryDirectory() as out:
            run = subprocess.run([sys.executable, __file__, "--child", "--zoo", args.zoo, "--variant", args.variant,
                                  "--images", str(n), "--batch", str(args.batch), "--out", out],
                                 capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"the study at {n} images failed:\n{run.stderr[-3000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        own = r["peak_kb"] - r["before_kb"]
        first = own if first is None else first
        print(f"{n:>7} {r['before_kb'] / 1024:>14.0f} {r['peak_kb'] / 1024:>8.0f} {own / 1024:>13.0f} "
              f"{own / max(first, 1):>15.2f} {r['seconds']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
