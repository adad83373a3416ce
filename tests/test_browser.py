"""The web app in a real browser (Debian's headless Chromium driven by Playwright): the page loads,
a picture is uploaded, Complete is clicked, the results appear, and nothing is fetched from outside.

Screenshots go to the test's tmp_path (printed); UPDATE_SCREENSHOT=1 also copies the image tab to
docs/app_image.png for the README. Without Chromium the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import running_app, tiny_checkpoint

from app.ui import EXAMPLES

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "app_image.png"
ROWS, SAMPLES = 56, 4  # 8 rows x 4 samples to sample: a few seconds with the tiny model


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("checkpoints")
    tiny_checkpoint(d / "image64", "image", steps=3, held_out_bits_per_dim=7.5)
    tiny_checkpoint(d / "audio12k", "audio", steps=4)
    with running_app(d) as url:
        yield url


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_upload_a_picture_and_complete_it(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
    page.goto(url)
    page.get_by_role("tab", name="Image completion").wait_for()
    page.locator("input[type=file]").first.set_input_files(str(EXAMPLES / "sunset.png"))
    set_slider(page, "prompt-rows", ROWS)
    set_slider(page, "image-samples", SAMPLES)
    page.get_by_label("Random seed").uncheck()
    page.locator("#image-crop img").wait_for(timeout=30_000)  # the 64x64 crop with its line
    page.get_by_role("button", name="Complete").click()
    page.locator("#image-status", has_text="completions of 56 prompt rows").wait_for(timeout=90_000)
    images = page.locator("#image-gallery img")
    assert images.count() == SAMPLES + 2  # prompt | samples | original
    assert page.locator("#image-preview img").count() == 1
    page.wait_for_timeout(500)  # let the last pictures paint
    shot = tmp_path / "app_image.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copy(shot, DOCS_SCREENSHOT)
    page.get_by_role("tab", name="Models").click()
    page.get_by_text("Attention layout of image64").wait_for()
    page.screenshot(path=str(tmp_path / "models.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'models.png'}")
    assert outside == []  # no fonts, scripts or telemetry from other hosts
    page.close()
