"""Driving Debian's headless Chromium with Debian's chromedriver (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


@contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path="/usr/bin/chromedriver")
    )
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: WebDriver, selector: str) -> str:
    """The text of the first element matching ``selector``, read in one script: a section
    can be swapped between finding an element and reading it."""
    found = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
        selector,
    )
    return str(found)


def until(driver: WebDriver, what: Callable[[], bool], message: str, seconds: float = 20) -> None:
    WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda _: what(), message)


def mark(driver: WebDriver) -> None:
    """Mark the window: a reload loses the mark."""
    driver.execute_script("window.__marker = 'the same page'")


def same_page(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return window.__marker") == "the same page")
