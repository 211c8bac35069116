"""What the browser tests share: where the browser and screenshots are, and how a test
drives the page (drop or pick files, find a file's row, wait for its state)."""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

from playwright.async_api import FilePayload, Locator, Page, expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"

# A whole job on the real model takes seconds; the deadline is for a slow CI machine.
JOB_DEADLINE_MS = 120_000


def unique(prefix: str) -> str:
    """A collection name no other test (or earlier run on the same data) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def snap(page: Page, name: str) -> None:
    """A full-page screenshot for a person to look at."""
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def live_row(page: Page, filename: str) -> Locator:
    """The row of one file in this session's uploads."""
    return page.locator("#live-rows tr").filter(
        has=page.locator("td.file", has_text=re.compile(f"^{re.escape(filename)}$"))
    )


async def expect_state(row: Locator, state: str, timeout_ms: int = JOB_DEADLINE_MS) -> None:
    """Wait (auto-retrying, up to the deadline) until the row shows this state."""
    await expect(row.locator(".state")).to_have_text(state, timeout=timeout_ms)


async def drop(page: Page, files: dict[str, bytes]) -> None:
    """Drag files onto the drop zone: real dragenter/dragover/drop events with a DataTransfer."""
    payload = {name: base64.b64encode(data).decode() for name, data in files.items()}
    transfer = await page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, b64] of Object.entries(files)) {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name));
            }
            return transfer;
        }""",
        payload,
    )
    zone = page.locator("#dropzone")
    for kind in ("dragenter", "dragover", "drop"):
        await zone.dispatch_event(kind, {"dataTransfer": transfer})


def payload(name: str, data: bytes) -> FilePayload:
    """A file as the browser's file picker would hand it over."""
    return {"name": name, "mimeType": "application/octet-stream", "buffer": data}


async def pick(page: Page, files: dict[str, bytes]) -> None:
    """Choose files with the file input, as the file picker would."""
    await page.locator("#file-input").set_input_files([payload(n, d) for n, d in files.items()])


async def open_page(page: Page, url: str, collection: str | None = None) -> None:
    """Load the page and set the upload collection."""
    await page.goto(url)
    await expect(page.locator("#jobs-message")).not_to_be_empty()
    if collection is not None:
        await page.locator("#upload-collection").fill(collection)
