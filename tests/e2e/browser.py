"""Headless Chromium for the browser tests (selenium + Debian's chromium and
chromium-driver): skipped without them, except in CI, where that fails.
HERALD_CHROMIUM / HERALD_CHROMEDRIVER point at other binaries."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.docker import in_ci

HEADLESS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu")


def binaries() -> tuple[str, str]:
    """Chromium and chromedriver, or a skip (a failure in CI) saying what is missing."""
    chromium = os.environ.get("HERALD_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = os.environ.get("HERALD_CHROMEDRIVER") or shutil.which("chromedriver")
    problem = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        problem = "selenium is not installed"
    if not chromium or not driver:
        problem = "headless Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    if problem:
        if in_ci():
            pytest.fail(problem + " (CI must provide them)", pytrace=False)
        pytest.skip(problem)
    assert chromium and driver
    return chromium, driver


@contextlib.contextmanager
def headless_chromium(*arguments: str, script_timeout: float | None = None) -> Iterator[Any]:
    """A selenium driver of headless Chromium (its console kept), quit on exit."""
    chromium, driver_path = binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (*HEADLESS, *arguments):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console.log too
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    if script_timeout is not None:
        driver.set_script_timeout(script_timeout)
    try:
        yield driver
    finally:
        driver.quit()


def open_tabs(driver: Any, url: str, count: int) -> list[str]:
    """`count` tabs showing `url` (the first is the driver's current one): their handles."""
    driver.get(url)
    handles = [driver.current_window_handle]
    for _ in range(count - 1):
        driver.switch_to.new_window("tab")
        driver.get(url)
        handles.append(driver.current_window_handle)
    return handles


def in_tab(driver: Any, handle: str, script: str, *args: Any) -> Any:
    """Run `script` (execute_script) in the tab `handle`, which becomes the current one."""
    driver.switch_to.window(handle)
    return driver.execute_script(script, *args)


def in_tab_async(driver: Any, handle: str, script: str, *args: Any) -> Any:
    """Run `script` (execute_async_script) in the tab `handle`, which becomes the current one."""
    driver.switch_to.window(handle)
    return driver.execute_async_script(script, *args)


def close_tab(driver: Any, handle: str, then: str) -> None:
    """Close the tab `handle` (its page goes as when the user closes it); `then` becomes current."""
    driver.switch_to.window(handle)
    driver.close()
    driver.switch_to.window(then)
