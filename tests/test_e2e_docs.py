"""GET /docs in a real headless Chromium: the API docs render the served OpenAPI document."""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.serving import RunningServer

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
INFERENCE_SUFFIXES = ("/infer", ":predict", ":score")
V2_INFER = "/v2/models/{name}/infer"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium, "chromium is missing; scripts/chromium.sh installs it"
    assert chromedriver, "chromedriver is missing; scripts/chromium.sh installs it"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(
        executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: webdriver.Chrome) -> str:
    # Swagger UI breaks paths with zero-width spaces after each slash.
    text: str = driver.execute_script("return document.body.innerText")
    return text.replace("\u200b", "")


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The console's error entries since the last call (reading the log empties it)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e["message"] for e in entries if e["level"] == "SEVERE"]


def test_the_api_docs_render_every_inference_operation(
    server: RunningServer, browser: webdriver.Chrome
) -> None:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    inference = sorted(p for p in paths if p.endswith(INFERENCE_SUFFIXES))
    assert V2_INFER in inference

    browser.get(f"{server.url}/docs")
    try:
        WebDriverWait(browser, 30).until(lambda d: all(p in page_text(d) for p in inference))
    except TimeoutException:
        text = page_text(browser)
        missing = [p for p in inference if p not in text]
        pytest.fail(
            f"/docs does not show {missing}; the page says {text[:500]!r}; "
            f"console errors: {console_errors(browser)}"
        )

    # Expanding an operation resolves its request and response schemas.
    browser.find_element(By.CSS_SELECTOR, f'[data-path="{V2_INFER}"]').click()
    WebDriverWait(browser, 10).until(lambda d: "Request body" in page_text(d))
    errors = browser.find_elements(By.CSS_SELECTOR, ".errors-wrapper")
    assert not errors, f"Swagger UI reports errors: {[e.text for e in errors]}"
    severe = console_errors(browser)
    assert not severe, f"console errors on /docs: {severe}"
