"""The web app in a real browser (Debian's headless Chromium driven by Playwright): the page loads,
a picture is uploaded, Complete is clicked, the results appear, and nothing is fetched from outside; the
History tab holds the result with its settings JSON; a clip plays while it is generated; the API view
lists the sample.py-named endpoints.

Screenshots go to the test's tmp_path (printed); UPDATE_SCREENSHOT=1 also copies the image tab to
docs/app_image.png for the README. Without Chromium the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from helpers import running_app, tiny_checkpoint

import app.handlers
from app.ui import EXAMPLES

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "app_image.png"
ROWS, SAMPLES = 56, 4  # 8 rows x 4 samples to sample: a few seconds with the tiny model
IMAGE_DEFAULTS = {"temperature": 1.03, "top_k": None, "top_p": 0.98, "chosen_by": "a test"}  # the card's


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
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("checkpoints")
    tiny_checkpoint(d / "image64", "image", steps=3, held_out_bits_per_dim=7.5, sampling=IMAGE_DEFAULTS)
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
    assert page.get_by_role("slider", name="Temperature").first.input_value() == "1.03"  # the card's, on the track
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
    page.get_by_role("tab", name="History").click()  # the result, with its settings JSON to download
    page.locator(".history-entry").first.wait_for(timeout=30_000)
    assert page.locator(".history-entry").count() == 1
    page.get_by_text("prompt_rows 56 · num_samples 4").wait_for()
    link = page.locator(".history-entry a[download='settings.json']").first.get_attribute("href")
    recipe = page.request.get(link if link.startswith("http") else url.rstrip("/") + link).json()
    assert recipe["kind"] == "image" and recipe["settings"]["prompt_rows"] == ROWS
    assert recipe["settings"]["num_samples"] == SAMPLES and recipe["checkpoint"]["name"] == "image64"
    assert (recipe["settings"]["temperature"], recipe["settings"]["top_p"]) == (1.03, 0.98)  # the card's defaults
    assert page.locator(".history-entry a[download$='.zip']").count() == 1
    page.screenshot(path=str(tmp_path / "history.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'history.png'}")
    page.get_by_role("tab", name="Models").click()
    page.get_by_text("Attention layout of image64").wait_for()
    page.screenshot(path=str(tmp_path / "models.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'models.png'}")
    assert outside == []  # no fonts, scripts or telemetry from other hosts
    page.close()


def test_a_clip_plays_while_it_is_generated(browser, url, tmp_path, monkeypatch):
    """Sampling slowed to about 1.5 s: the page's player has scheduled the start of the clip while the status
    still says "Sampling…", plays it on in several parts without restarting, and the History tab holds it."""
    real = app.handlers.generate_audio

    def slow(*args, **kwargs):
        for report in real(*args, **kwargs):
            time.sleep(0.3)
            yield report

    monkeypatch.setattr(app.handlers, "generate_audio", slow)
    monkeypatch.setattr(app.handlers, "STREAM_SAMPLES", 600)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="Audio").click()
    set_slider(page, "audio-length", 0.3)  # 3,600 samples, reported every 1,024
    page.get_by_role("button", name="Generate").click()
    status = page.locator("#audio-status")
    heard_while_sampling = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text, parts = page.evaluate("""() => [document.querySelector('#audio-status').innerText,
                                             (window.studioPlayer && window.studioPlayer.log.length) || 0]""")
        if "from scratch" in text:
            break
        heard_while_sampling |= parts > 0 and "Sampling" in text
        time.sleep(0.05)
    status.filter(has_text="from scratch").wait_for(timeout=5_000)
    page.wait_for_timeout(500)  # the final clip's fetch
    player = page.evaluate("""() => ({log: window.studioPlayer.log, error: window.studioPlayer.error || null,
                                      state: window.studioPlayer.ctx.state,
                                      scheduled: window.studioPlayer.scheduled})""")
    assert player["error"] is None and player["state"] == "running"
    assert heard_while_sampling, player
    assert len(player["log"]) >= 2 and abs(player["scheduled"] - 0.3) < 0.01, player
    froms = [part["from"] for part in player["log"]]
    assert froms[0] == 0 and froms == sorted(froms)  # each part goes on from where the last one ended
    page.get_by_role("tab", name="History").click()
    page.locator(".history-entry").first.wait_for(timeout=30_000)
    page.get_by_text("samples 3600").wait_for()
    page.screenshot(path=str(tmp_path / "audio.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'audio.png'}")
    page.close()


def test_the_api_view_lists_the_sample_py_endpoints(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_text("Use via API").first.click()
    page.get_by_text("API name: /sample_image").first.wait_for(timeout=30_000)
    page.get_by_text("API name: /sample_audio").first.wait_for()
    page.get_by_text("rows of the prompt kept, 0..63 (default 32 with a prompt, 0 without)").wait_for()
    assert page.get_by_text("API name: /complete_image").count() == 0
    page.close()
