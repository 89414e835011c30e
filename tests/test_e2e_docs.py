"""GET /docs in a real headless Chromium: the API docs render the served OpenAPI document."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser import chromium, console_errors
from tests.serving import RunningServer

INFERENCE_SUFFIXES = ("/infer", ":predict", ":score")
V2_INFER = "/v2/models/{name}/infer"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    with chromium(tmp_path) as driver:
        yield driver


def page_text(driver: webdriver.Chrome) -> str:
    # Swagger UI breaks paths with zero-width spaces after each slash.
    text: str = driver.execute_script("return document.body.innerText")
    return text.replace("\u200b", "")


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
