"""A real headless Chromium (Debian's chromium and chromium-driver, scripts/chromium.sh)."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Every host but the server's fails to resolve, so an asset fetched from a CDN is an error.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@contextmanager
def chromium(folder: Path) -> Iterator[webdriver.Chrome]:
    """Chromium with its profile and driver log in `folder`, and the console log kept."""
    binary, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary, "chromium is missing; scripts/chromium.sh installs it"
    assert chromedriver, "chromedriver is missing; scripts/chromium.sh installs it"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(
        executable_path=chromedriver, log_output=str(folder / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The console's error entries since the last call (reading the log empties it)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e["message"] for e in entries if e["level"] == "SEVERE"]
