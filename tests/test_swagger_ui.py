"""Swagger UI in a real headless Chromium, with every host but this machine unreachable.

Chromium resolves no name but 127.0.0.1 (--host-resolver-rules), and its performance log (the
DevTools protocol's Network events) records every request the page makes: none may leave
127.0.0.1. The page must render every operation under its Content Security Policy with no
console error, ignore `?url=`, pre-fill each body with its first example, and run one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.browser import (
    CHROMEDRIVER_PATHS,
    CHROMIUM_FLAGS,
    CHROMIUM_PATHS,
    _first_existing,
    console_errors,
    missing_browser,
    require_browser,
)
from tests.support import Instance

pytestmark = pytest.mark.browser

# Every name resolves to nothing but 127.0.0.1 itself: a font, a CDN or a validator badge
# would fail to load, and show in the log as a request to another host.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
# What the browser makes or reads itself, never over the network (chrome: its start page).
LOCAL_SCHEMES = {"data", "blob", "about", "chrome"}


@contextmanager
def offline_chromium() -> Iterator[Any]:
    """tests/browser.py's headless Chromium, offline, with its network log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = _first_existing("CHROMIUM_PATH", CHROMIUM_PATHS)
    driver_path = _first_existing("CHROMEDRIVER_PATH", CHROMEDRIVER_PATHS)
    assert binary and driver_path, missing_browser()
    profile = tempfile.mkdtemp(prefix="taskapp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, OFFLINE, f"--user-data-dir={profile}", "--window-size=1400,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    require_browser()
    with offline_chromium() as driver:
        yield driver


@pytest.fixture
def instance(browser: Any, instances: Callable[..., Instance]) -> Instance:
    return instances(WORKER_ENABLED=0)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser asked for since the last call (the log is drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def outside(urls: list[str], base: str) -> list[str]:
    origin = urlsplit(base)
    return [
        url
        for url in urls
        if urlsplit(url).scheme not in LOCAL_SCHEMES
        and (urlsplit(url).hostname, urlsplit(url).port) != (origin.hostname, origin.port)
    ]


def until(driver: Any, condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: condition())
    except TimeoutException:
        page = driver.find_element("tag name", "body").text[:3000]
        raise AssertionError(f"timed out waiting for {what}; the page shows:\n{page}") from None


def open_docs(driver: Any, url: str) -> int:
    """Open the docs page at url and wait for its operations; return how many it lists."""
    driver.get(url)
    return until(
        driver,
        lambda: driver.execute_script("return document.querySelectorAll('.opblock').length"),
        "Swagger UI to list the operations",
    )


def js_click(driver: Any, element: Any) -> None:
    # A plain click can land on a panel still sliding open.
    driver.execute_script("arguments[0].click()", element)


def operation_block(driver: Any, tag: str, operation_id: str) -> Any:
    """An operation's block, opened."""
    selector = f"#operations-{tag}-{operation_id}"
    block = until(driver, lambda: driver.find_elements("css selector", selector), selector)[0]
    if not block.find_elements("css selector", ".opblock-body"):
        js_click(driver, block.find_element("css selector", ".opblock-summary-control"))
    until(driver, lambda: block.find_elements("css selector", ".try-out"), f"{selector} to open")
    return block


def test_swagger_ui_renders_every_operation_with_nothing_from_outside(
    browser: Any, instance: Instance
) -> None:
    spec = requests.get(f"{instance.url}/apispec_1.json", timeout=10).json()
    documented = sum(
        method in {"get", "put", "post", "delete", "patch"}
        for item in spec["paths"].values()
        for method in item
    )
    page = requests.get(f"{instance.url}/apidocs/", timeout=10)
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self' 'nonce-" in policy
    assert "connect-src 'self'" in policy and "unsafe" not in policy

    assert open_docs(browser, f"{instance.url}/apidocs/") == documented
    version = browser.execute_script("return window.versions.swaggerUI.version")
    assert version.startswith("5."), version
    title = browser.find_element("css selector", ".info .title").text
    assert title.startswith("taskapp")
    urls = requested_urls(browser)
    assert f"{instance.url}/apispec_1.json" in urls
    assert outside(urls, instance.url) == []
    # A refused script, style or font under the CSP is a console error too.
    assert console_errors(browser) == []

    # The log does see a request that leaves: on a page without the docs' CSP, ask for a
    # font from Google as flasgger's old page did.
    browser.get(f"{instance.url}/apispec_1.json")
    browser.execute_async_script(
        "const done = arguments[0];"
        "fetch('https://fonts.googleapis.com/css?family=Open+Sans').then(done, () => done());"
    )
    assert outside(requested_urls(browser), instance.url) == [
        "https://fonts.googleapis.com/css?family=Open+Sans"
    ]


def test_query_configuration_is_ignored(browser: Any, instance: Instance) -> None:
    """`?url=` and `?configUrl=` (spec spoofing, Swagger UI before 4.1.3) change nothing."""
    spoof = "http://127.0.0.1:9/evil.json"
    count = open_docs(
        browser, f"{instance.url}/apidocs/?url={spoof}&configUrl={spoof}&urls.primaryName=x"
    )
    assert count > 20
    assert browser.find_element("css selector", ".info .title").text.startswith("taskapp")
    urls = requested_urls(browser)
    assert spoof not in urls and f"{instance.url}/apispec_1.json" in urls
    assert outside(urls, instance.url) == []


def test_try_it_out_pre_fills_the_examples_and_they_run(browser: Any, instance: Instance) -> None:
    spec = requests.get(f"{instance.url}/apispec_1.json", timeout=10).json()
    open_docs(browser, f"{instance.url}/apidocs/")
    # Every body is pre-filled with its first example.
    for item in spec["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            examples = operation["requestBody"]["content"]["application/json"]["examples"]
            first = next(iter(examples.values()))["value"]
            block = operation_block(browser, operation["tags"][0], operation["operationId"])
            js_click(browser, block.find_element("css selector", ".try-out__btn"))
            body = until(
                browser,
                lambda b=block: b.find_elements("css selector", "textarea.body-param__text"),
                f"{operation['operationId']}'s body editor",
            )[0]
            assert json.loads(body.get_attribute("value")) == first, operation["operationId"]

    # And Execute runs the create as shown: 201, and the task is there.
    block = operation_block(browser, "tasks", "create_task")
    if not block.find_elements("css selector", ".execute"):
        js_click(browser, block.find_element("css selector", ".try-out__btn"))
    js_click(
        browser,
        until(browser, lambda: block.find_elements("css selector", ".execute"), "Execute")[0],
    )
    status = until(
        browser,
        lambda: block.find_elements(
            "css selector", ".live-responses-table .response .response-col_status"
        ),
        "the live response",
    )[0]
    assert status.text == "201"
    (task,) = requests.get(f"{instance.url}/tasks/", timeout=10).json()
    assert task["title"] == "Process customer feedback" and task["conversation_count"] == 2
    assert outside(requested_urls(browser), instance.url) == []
    assert console_errors(browser) == []
