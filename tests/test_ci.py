"""No silent skips in CI: pytest's own exit status and report, on a test that skips (``tests/ci.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _pytest(tmp_path: Path, reason: str, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_skipping.py").write_text(
        f"import pytest\n\ndef test_it():\n    pytest.skip({reason!r})\n\ndef test_other():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(TESTS)}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_skipping.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("reason, ci, code", [
    ("Debian's chromium is not installed", True, 1),  # a browser, a dataset, a compiler: never skipped in CI
    ("no CUDA GPU on this machine", True, 0),  # CI machines have none
    ("Debian's chromium is not installed", False, 0),  # outside CI a skip says why, and passes
])
def test_a_skip_fails_a_ci_run_unless_ci_allows_it(tmp_path, reason, ci, code):
    done = _pytest(tmp_path, reason, ci)
    assert done.returncode == code, done.stdout[-3000:]
    assert "1 passed, 1 skipped" in done.stdout
    assert ("skipped in CI: not allowed" in done.stdout) == (code == 1)
    if code == 1:
        assert f"test_skipping.py::test_it: {reason}" in done.stdout
