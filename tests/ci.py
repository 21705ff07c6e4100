"""What a test needs from the machine, and what CI may not skip.

With ``CI=true`` (CI services set it, and so does ``.ci/run``) a test whose browser, dataset or
compiler is missing fails with the reason: ``.ci/run`` installs all of them, so a missing one is a
broken CI machine, not a test to skip. Elsewhere the test skips and says what to install.

This module is also a pytest plugin (``conftest.py`` registers it): under ``CI=true`` a run with
any skip whose reason is not in :data:`CI_MAY_SKIP` fails, and the summary lists those skips.
``tests/test_ci.py`` runs pytest on a skipping test to check it.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CHROMIUM = Path("/usr/bin/chromium")  # what tests/chromium.py launches and .ci/run checks
# CI machines have no GPU: the GPU-only tests, and the one that needs a machine without a GPU, may skip.
CI_MAY_SKIP = ("no CUDA GPU", "this machine has a GPU")


def require(missing: str | None) -> None:
    """Skip with ``missing`` (the reason, naming what to install), or fail under CI; nothing if None."""
    if missing is None:
        return
    if IN_CI:
        pytest.fail(f"{missing}. CI must have it (.ci/run installs it): a test that needs it never skips in CI",
                    pytrace=False)
    pytest.skip(missing)


def chromium_missing() -> str | None:
    if CHROMIUM.exists():
        return None
    return f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"


def playwright_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements.txt)"
    return None


def fashion_mnist_missing() -> str | None:
    from surgery.data import offline_available

    if offline_available("resnet18-fashionmnist"):
        return None
    return "Debian's Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"


def compiler_missing() -> str | None:
    """Why NNCF cannot compile its CPU extension here (a C++ compiler, ninja on PATH, Python's headers), or None."""
    from torch.utils import cpp_extension

    missing = [] if shutil.which(os.environ.get("CXX", "c++")) else ["a C++ compiler (apt-get install g++)"]
    if not cpp_extension.is_ninja_available():
        missing.append("ninja on PATH (pip install ninja, with the venv's bin/ on PATH)")
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        missing.append("Python.h (apt-get install python3.11-dev)")
    return f"NNCF cannot compile its CPU extension here: no {' and no '.join(missing)}" if missing else None


# -- the plugin: no silent skips in CI -------------------------------------------------------------

_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def forbidden_skips() -> list[tuple[str, str]]:
    """The skips of this session that CI does not allow: (test id, reason)."""
    return [(node, reason) for node, reason in _skips if not reason.startswith(CI_MAY_SKIP)] if IN_CI else []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.OK and forbidden_skips():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    forbidden = forbidden_skips()
    if forbidden:
        terminalreporter.section("skipped in CI: not allowed (CI=true)", red=True)
        for node, reason in forbidden:
            terminalreporter.write_line(f"{node}: {reason}")
