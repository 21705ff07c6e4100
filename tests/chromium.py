"""Debian's chromium under Playwright, as the browser tests launch it (``.ci/run`` installs it with apt)."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# No background networking: this machine's closed network refuses chromium's own connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parents[1] / "artifacts" / "browser"  # screenshots kept by the tests


def launch(playwright):
    """A headless chromium browser from a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
