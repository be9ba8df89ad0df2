"""The web playground at / in a real headless browser (Debian's chromium driven by Playwright), and the PNG layout
query parameters (?scale=, ?nrow=) it downloads with.

The browser test is skipped when Playwright for Python or /usr/bin/chromium is missing (`apt-get install chromium`;
`playwright install` is never needed). With SKDCGN_PLAYGROUND_SCREENSHOT=docs/playground.png it also saves a
screenshot of the page for the README.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.vocabulary import LABEL_NAMES
from tests.paths import REPO

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_ENV = "SKDCGN_PLAYGROUND_SCREENSHOT"
TIMEOUT_MS = 60_000
JOB_TIMEOUT_MS = 120_000
BODY = {"shape": 3, "texture": 2, "background": 5, "n": 4, "seed": 123}


def png_size(response) -> tuple[int, int]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content)).size


# --- PNG answers: ?scale= and ?nrow= ---------------------------------------------------------------------------------

def test_png_scale_and_nrow_lay_out_the_grid(client):
    png = {"Accept": "image/png"}
    plain = client.post("/counterfactual", json=BODY, headers=png)
    assert png_size(plain) == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # ⌈√4⌉ = 2 per row, 2-pixel padding, as before
    assert png_size(client.post("/counterfactual?nrow=4", json=BODY, headers=png)) == (4 * 32 + 5 * 2, 32 + 2 * 2)
    assert png_size(client.post("/counterfactual?nrow=1", json=BODY, headers=png)) == (32 + 2 * 2, 4 * 32 + 5 * 2)
    assert png_size(client.post("/counterfactual?nrow=99", json=BODY, headers=png)) == (4 * 32 + 5 * 2, 32 + 2 * 2)
    scaled = client.post("/counterfactual?scale=3&nrow=4", json=BODY, headers=png)
    assert png_size(scaled) == (4 * 96 + 5 * 2, 96 + 2 * 2)

    # Nearest-neighbour: each pixel of the plain grid becomes a 3×3 block of the same colour.
    small = np.asarray(Image.open(io.BytesIO(client.post("/counterfactual?nrow=4", json=BODY, headers=png).content)))
    big = np.asarray(Image.open(io.BytesIO(scaled.content)))
    for index in range(4):
        tile = small[2:34, 2 + index * 34: 34 + index * 34]
        np.testing.assert_array_equal(big[2:98, 2 + index * 98: 98 + index * 98], tile.repeat(3, 0).repeat(3, 1))

    # One image: the image itself, upscaled, without padding.
    one = client.post("/counterfactual?scale=4", json=BODY | {"n": 1}, headers=png)
    assert png_size(one) == (128, 128) and one.headers["x-seed"] == "123"
    generated = client.post("/generate/shape?scale=2&nrow=3", json={"label": 3, "n": 3, "seed": 9}, headers=png)
    assert png_size(generated) == (3 * 64 + 4 * 2, 64 + 2 * 2)

    # JSON answers ignore the layout; the query is validated all the same.
    assert client.post("/counterfactual?scale=5", json=BODY).json()["n"] == 4


@pytest.mark.parametrize("query", ["scale=0", "scale=17", "scale=two", "nrow=0", "nrow=-1"])
def test_png_layout_out_of_bounds_is_422(client, query):
    answer = client.post(f"/counterfactual?{query}", json=BODY, headers={"Accept": "image/png"})
    assert answer.status_code == 422, answer.text
    assert query.split("=")[0] in answer.json()["error"]


def test_png_over_the_pixel_limit_is_422_before_it_is_drawn():
    from service.routes.render import PNG_MAX_PIXELS, PngLayout, png_picture
    from service.errors import ServiceError

    images = np.zeros((16, 256, 256, 3), np.uint8)  # an ImageNet-sized batch: 16 × (256·16)² pixels at scale 16
    with pytest.raises(ServiceError) as refused:
        png_picture(images, PngLayout(scale=16))
    assert refused.value.status == 422 and str(PNG_MAX_PIXELS) in refused.value.message
    assert png_picture(images[:1], PngLayout(scale=4)).shape == (1024, 1024, 3)


def test_playground_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    for name, media in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and media in asset.headers["content-type"]
    missing = client.get("/static/nothing.js")
    assert missing.status_code == 404 and "error" in missing.json()
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is no API route


# --- the page in a browser -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                                  "(pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def tiles(page, row: str = "images"):
    return page.locator(f'#rows [data-row="{row}"] img.tile')


def wait_tiles(page, count: int, row: str = "images") -> list[str]:
    """Waits until `row` holds `count` decoded images; their src attributes."""
    page.wait_for_function(
        """([row, count]) => {
            const images = [...document.querySelectorAll(`#rows [data-row="${row}"] img.tile`)];
            return images.length === count && images.every((img) => img.complete && img.naturalWidth > 0);
        }""", arg=[row, count], timeout=TIMEOUT_MS)
    return [tiles(page, row).nth(i).get_attribute("src") for i in range(count)]


def test_playground_renders_changes_and_runs_a_job(stack, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{stack.url}/")

        # On load: the default model's counterfactuals for the default labels, n of them, decoded.
        n = int(page.input_value("#n"))
        first = wait_tiles(page, n)
        assert all(src.startswith("data:image/png;base64,") for src in first)
        assert page.input_value("#family") == "double_colored_mnist"
        assert (page.input_value("#shape"), page.input_value("#texture"), page.input_value("#background")) == \
            ("3", "2", "5")
        # Labels with their names (core.vocabulary's tables): README's "texture of a 2 (lime) on the background of
        # a 5 (burlywood)"; a shape label is its digit.
        chosen = {m: page.locator(f"#{m} option:checked").inner_text() for m in ("shape", "texture", "background")}
        assert chosen == {"shape": "3", "texture": "2 · lime", "background": "5 · burlywood"}
        assert page.locator("#job-texture").get_attribute("title").startswith("0 yellow, 1 burlywood, 2 lime")
        assert page.locator("#play-error").is_hidden()
        assert page.eval_on_selector("#rows img.tile", "img => getComputedStyle(img).imageRendering") == "pixelated"
        assert page.eval_on_selector("#rows img.tile", "img => img.width") == 32 * 4  # upscaled 4×

        # Another texture label: other images.
        page.select_option("#texture", "7")
        page.wait_for_function("src => document.querySelector('#rows img.tile').src !== src", arg=first[0])
        changed = wait_tiles(page, n)
        assert changed != first

        # Another n, and the components.
        page.fill("#n", "3")
        page.dispatch_event("#n", "change")
        wait_tiles(page, 3)
        page.check("#components")
        for row in ("mask", "texture", "background"):
            wait_tiles(page, 3, row)
        assert page.inner_text('#rows [data-row="texture"] .row-name') == "darkblue"  # texture 7, as chosen above
        assert page.inner_text('#rows [data-row="background"] .row-name') == "burlywood"
        assert page.locator('#rows [data-row="mask"] .row-name').count() == 0  # a shape label is only its digit

        # A server error is shown, not swallowed: n over the stack's SKDCGN_MAX_N (16).
        page.fill("#n", "17")
        page.dispatch_event("#n", "change")
        page.wait_for_selector("#play-error:not([hidden])")
        assert "over this server's maximum of 16" in page.inner_text("#play-error")
        page.fill("#n", "6")
        page.select_option("#texture", "2")
        page.dispatch_event("#n", "change")
        page.wait_for_selector("#play-error", state="hidden")
        wait_tiles(page, 6)
        for row in ("mask", "texture", "background"):
            wait_tiles(page, 6, row)
        screenshot = os.environ.get(SCREENSHOT_ENV)
        if screenshot:
            page.locator("#n").blur()
            page.screenshot(path=str(REPO / screenshot) if not Path(screenshot).is_absolute() else screenshot)

        # Download PNG: the server's grid, upscaled by the zoom (?scale=4), n per row (?nrow=6).
        with page.expect_download() as download:
            page.click("#download-png")
        assert download.value.suggested_filename == "counterfactual_3-2-5_seed123.png"
        assert Image.open(download.value.path()).size == (6 * 128 + 7 * 2, 128 + 2 * 2)

        # Another family: its labels, and its images.
        before = tiles(page).first.get_attribute("src")
        page.select_option("#family", "wildlife_mnist")
        page.wait_for_function("() => document.querySelector('#play-status').textContent.startsWith('wildlife_mnist')")
        assert wait_tiles(page, 6)[0] != before
        for mechanism in ("texture", "background"):  # its textures' names
            names = page.locator(f"#{mechanism} option").all_inner_texts()
            assert names == [f"{k} · {name}" for k, name in enumerate(LABEL_NAMES["wildlife_mnist"][mechanism])]
        page.select_option("#family", "double_colored_mnist")

        # The jobs tab: create a job and watch it succeed, with its download link.
        page.click("#tab-jobs")
        page.fill("#job-n", "120")
        page.fill("#job-shape", "0-2, 7")
        with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as created:
            page.click("#create-job")
        assert created.value.status == 202, created.value.text()
        job = created.value.json()
        row = page.locator(f'#jobs-body tr[data-job="{job["id"]}"]')
        row.wait_for()
        page.wait_for_selector(f'#jobs-body tr[data-job="{job["id"]}"][data-state="succeeded"]',
                               timeout=JOB_TIMEOUT_MS)
        assert row.locator(".count").inner_text() == "120 / 120"
        link = row.locator("a.download").first
        assert f"/jobs/{job['id']}/result" in link.get_attribute("href")
        assert page.locator("#jobs-error").is_hidden()
        assert page_errors == []
    finally:
        context.close()


def test_playground_sends_the_api_key_and_shows_refusals(stack, browser):
    """With SKDCGN_API_KEYS (rendering included), the page shows the 401 and works once the key is entered; the key
    is kept in localStorage."""
    key = "playground-key-0123456789"
    url = stack.start_gateway(api_keys=key, api_keys_for_generation=1)
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{url}/")
        page.wait_for_selector("#play-error:not([hidden])")
        assert "401" in page.inner_text("#play-error") and "X-API-Key" in page.inner_text("#play-error")
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        wait_tiles(page, int(page.input_value("#n")))
        page.wait_for_selector("#play-error", state="hidden")
        assert page.evaluate("localStorage.getItem('skdcgn.apiKey')") == key

        page.click("#tab-jobs")
        page.fill("#job-n", "20")
        with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as created:
            page.click("#create-job")
        assert created.value.status == 202, created.value.text()
        assert created.value.request.headers.get("x-api-key") == key
        job_id = created.value.json()["id"]
        page.wait_for_selector(f'#jobs-body tr[data-job="{job_id}"][data-state="succeeded"]', timeout=JOB_TIMEOUT_MS)

        # The download goes through fetch() with the key (a plain link could not send the header).
        with page.expect_download() as download:
            page.locator(f'#jobs-body tr[data-job="{job_id}"] a.download').first.click()
        assert download.value.suggested_filename.endswith(".npz")
        assert Path(download.value.path()).stat().st_size > 0

        # A reload keeps the key.
        page.reload()
        wait_tiles(page, int(page.input_value("#n")))
    finally:
        context.close()
        stack.stop_gateway(url)
