"""Headless Chromium for tests: install it when missing (root only), render a page, read its console.

Chromium (Debian's `chromium`, 156 when this was written) started with `--enable-logging=stderr --v=0`
writes every console message of the page to stderr as one line, whatever its level:

    [pid:tid:MMDD/HHMMSS.micros:INFO:CONSOLE:1] "Uncaught ReferenceError: f is not defined", source: file:///x.html (1)

Content-Security-Policy violations (a blocked image, stylesheet or inline script) arrive the same way,
so a page without scripts that declares a strict CSP must produce no CONSOLE line at all.
`tests/test_report.py` renders a page with deliberate errors to prove these lines are still detected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get update && apt-get install -y chromium"
_CONSOLE = re.compile(r":CONSOLE[:(]")


def ensure_chromium() -> str:
    """Path of the chromium binary; installs Debian's package first when we are root, else skips."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(
            f"browser test: {CHROMIUM} is missing and we are not root; install it with `sudo sh -c '{INSTALL}'`"
        )
    if shutil.which("apt-get") is None:
        pytest.skip(f"browser test: {CHROMIUM} is missing and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(
            ["sh", "-c", INSTALL], env=env, capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"browser test: `{INSTALL}` took more than 15 minutes")
    if proc.returncode != 0 or not os.path.exists(CHROMIUM):
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        pytest.skip(f"browser test: `{INSTALL}` failed (exit {proc.returncode}): {' | '.join(tail)}")
    return CHROMIUM


@dataclass
class Rendered:
    screenshot: Path
    console: list[str]  # the page's console messages (errors, CSP violations, logs)
    stderr: str


def render(
    page: Path, screenshot: Path, width: int = 1200, height: int = 3000, timeout: float = 120
) -> Rendered:
    """Load `page` (a local file) in headless Chromium, offline, and take a screenshot of the window."""
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",  # as root in a container
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={screenshot}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not screenshot.exists():
        raise AssertionError(
            f"chromium exited {proc.returncode} without a screenshot:\n{proc.stderr[-2000:]}"
        )
    console = [line for line in proc.stderr.splitlines() if _CONSOLE.search(line)]
    return Rendered(screenshot, console, proc.stderr)


def image_spread(png: Path) -> tuple[float, int]:
    """(standard deviation of the pixel values, number of distinct colours) of a screenshot."""
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    return float(rgb.std()), len(colours)
