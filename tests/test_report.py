"""``python -m space.report`` is kept as an alias of ``python -m study`` (``tests/test_study.py`` tests the study)."""

from __future__ import annotations

import subprocess
import sys


def test_space_report_runs_the_study_and_refuses_a_directory_without_fp32(tmp_path):
    run = subprocess.run([sys.executable, "-m", "space.report", "--zoo", str(tmp_path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "no fp32 variant" in run.stderr  # the study's own message
    assert "Traceback" not in run.stderr
