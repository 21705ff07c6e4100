"""``python -m space.report``: kept as an alias of ``python -m study``, which now writes the report.

The analysis (seed null, dose-response, per-class damage, layer diagnostics, intervals) lives in
the :mod:`study` package; this module holds no code of its own.

Example:
    $ python -m space.report --zoo zoo/resnet18-shapes --out reports/shapes --images 512 --seed 0
"""

from study.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
