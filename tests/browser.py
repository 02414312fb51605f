"""Headless Chromium for the browser tests: Debian's chromium driven by Selenium and chromedriver.

Nothing is downloaded: the browser and the driver are the system's (CHROMIUM_PATH and
CHROMEDRIVER_PATH override where they are looked for); ./test.sh installs them when missing.
When either is still missing the tests fail, saying what to install: they are never skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install -r requirements-dev.txt"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _first_existing(override: str, candidates: tuple[str, ...]) -> str | None:
    explicit = os.environ.get(override)
    if explicit:
        return explicit if os.path.exists(explicit) else None
    for path in candidates:
        if os.path.exists(path):
            return path
    return None


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed ({INSTALL_HINT})"
    if _first_existing("CHROMIUM_PATH", CHROMIUM_PATHS) is None:
        return f"no Chromium found at {', '.join(CHROMIUM_PATHS)} ({INSTALL_HINT})"
    if _first_existing("CHROMEDRIVER_PATH", CHROMEDRIVER_PATHS) is None:
        return f"no chromedriver found at {', '.join(CHROMEDRIVER_PATHS)} ({INSTALL_HINT})"
    return None


def require_browser() -> None:
    """Fail the calling test, saying what to install, when there is no browser."""
    reason = missing_browser()
    if reason is not None:
        pytest.fail(f"the browser tests need a browser: {reason}")


@contextmanager
def chromium(
    width: int = 1440, height: int = 1000, timezone: str | None = None
) -> Iterator[WebDriver]:
    """A fresh headless Chromium with its own profile; its console is kept for `console_errors`.

    `timezone` (an IANA name, e.g. "Asia/Kolkata") is the browser's zone, as TZ sets it for the
    whole process; without it the browser has this machine's.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = _first_existing("CHROMIUM_PATH", CHROMIUM_PATHS)
    driver_path = _first_existing("CHROMEDRIVER_PATH", CHROMEDRIVER_PATHS)
    assert binary and driver_path, missing_browser()
    profile = tempfile.mkdtemp(prefix="taskapp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    env = {**os.environ, "TZ": timezone} if timezone else None  # chromedriver passes it on
    # An explicit driver path keeps Selenium Manager from trying to download one.
    service = Service(executable_path=driver_path, env=env)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """Console messages at error level (uncaught exceptions, console.error, failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
