"""The browser every page test drives: Debian's Chromium, one for the session, a fresh
context (own storage) per test."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from browser.page_kit import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

# No skipping: scripts/test.sh installs Debian's chromium, and a missing browser must fail
# loudly rather than leave the page untested.
assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; Playwright never downloads a browser of its own."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh tab (own session storage); fails the test on any script error in the page."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def on_console(message: Any) -> None:
        # Chromium logs every 4xx answer; the page is meant to receive some of those.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console error: {message.text}")

    opened.on("console", on_console)
    try:
        yield opened
    finally:
        await context.close()
    assert problems == []
