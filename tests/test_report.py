"""``python -m space.report`` is an alias of ``python -m study`` (``tests/test_study.py`` tests the study)."""

from __future__ import annotations

import subprocess
import sys

import space.report
import study.__main__


def test_space_report_is_the_study_entry_point():
    assert space.report.main is study.__main__.main


def test_space_report_refuses_a_directory_without_fp32(tmp_path):
    run = subprocess.run([sys.executable, "-m", "space.report", "--zoo", str(tmp_path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "no fp32 variant" in run.stderr
    assert "Traceback" not in run.stderr
