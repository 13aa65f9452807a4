"""`cdsam demo` in a real headless browser (Debian's chromium + chromedriver, via Selenium):
upload, prompt, click, and the page's masks equal `cdsam predict`'s for the same input."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdsam import cli
from cdsam.errors import UserError
from cdsam.inference.demo import parse_prompts, segment
from cdsam.inference.predictor import load_model
from tests.test_instance_files import _checkpoint
from tests.test_predict import _image, ckpt  # noqa: F401  (the module-scoped checkpoint)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_prompts_are_one_per_line_deduplicated():
    assert parse_prompts("a red circle\n\n a blue square ; a red circle\n!!\n") == \
        ["a red circle", "a blue square"]


def test_segment_writes_the_masks_predict_gives_and_says_what_is_missing(ckpt, tmp_path):  # noqa: F811
    image = Image.fromarray(_image(40, 56))
    predictor = load_model(ckpt)
    (_, layers), files, rows = segment(predictor, image, "a red circle\na blue square", [],
                                       0.5, tmp_path)
    pred = predictor.predict(image, ["a red circle", "a blue square"])
    for mask, layer, path, row in zip(pred.masks, layers, files, rows, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)) > 0, mask)
        assert np.array_equal(layer[0] > 0, mask) and row[1] == mask.sum()
    with pytest.raises(UserError, match="at least one prompt"):
        segment(predictor, image, " \n ", [], 0.5, tmp_path)
    with pytest.raises(UserError, match="upload or pick an image"):
        segment(predictor, None, "a red circle", [], 0.5, tmp_path)


def test_segment_shows_each_object_and_writes_the_id_png_predict_writes(tmp_path):
    objects_ckpt = _checkpoint(tmp_path / "ckpt", min_quality=0.0)
    image = Image.fromarray(_image(40, 56))
    predictor = load_model(objects_ckpt)
    (_, layers), files, rows = segment(predictor, image, "a red circle\na blue square", [],
                                       0.5, tmp_path / "demo", objects=True)
    pred = predictor.predict(image, ["a red circle", "a blue square"], instances=True)
    assert [r[3] for r in rows] == [len(o) for o in pred.instances]
    assert len(layers) == sum(len(o) for o in pred.instances) > 0
    assert layers[0][1].startswith("a red circle 1 (") or layers[0][1].startswith("a blue")
    image.save(tmp_path / "x.png")
    with pytest.raises(SystemExit):
        cli.main(["predict", "--checkpoint", str(objects_ckpt), "--image", str(tmp_path / "x.png"),
                  "--prompt", "a red circle", "--prompt", "a blue square", "--out",
                  str(tmp_path / "cli"), "--instances", "--no-progress", "--no-overlay"])
    assert files[-1].endswith("instances.png")
    assert np.array_equal(np.asarray(Image.open(files[-1])),
                          np.asarray(Image.open(tmp_path / "cli" / "x__instances.png")))
    with pytest.raises(UserError, match="from the text alone"):
        segment(predictor, image, "a red circle", [(3.0, 4.0)], 0.5, tmp_path, objects=True)
    old = load_model(_checkpoint(tmp_path / "old", instances=False))
    with pytest.raises(UserError, match="no instance heads"):
        segment(old, image, "a red circle", [], 0.5, tmp_path, objects=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium/chromedriver: apt install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1300"):
        opts.add_argument(arg)
    # The Debian driver, never Selenium Manager (it would try to download one).
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_demo_page_in_a_headless_browser_matches_cdsam_predict(ckpt, browser, tmp_path):  # noqa: F811
    pytest.importorskip("gradio")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from cdsam.inference.demo import serve

    path = tmp_path / "upload.png"
    Image.fromarray(_image(40, 56)).save(path)
    prompts = ["a red circle", "a blue square"]
    demo, url = serve(ckpt, port=_free_port(), device="cpu", block=False)
    try:
        assert url.startswith("http://127.0.0.1:")  # localhost unless --host says otherwise
        wait = WebDriverWait(browser, 60)
        browser.get(url)
        wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, "#cdsam-image input[type=file]"))).send_keys(str(path))
        shown = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#cdsam-image img")))
        box = browser.find_element(By.CSS_SELECTOR, "#cdsam-prompts textarea")
        box.clear()
        box.send_keys("\n".join(prompts))
        browser.find_element(By.ID, "cdsam-run").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "cdsam-status"), "0 clicks"))
        links = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cdsam-files a[href]")
                           if len(d.find_elements(By.CSS_SELECTOR, "#cdsam-files a[href]")) == 2
                           else False)
        page = {Path(a.get_attribute("href")).name: _fetch(a.get_attribute("href"))
                for a in links}
        shot = tmp_path / "demo.png"
        browser.save_screenshot(str(shot))
        print(f"demo screenshot: {shot}")
        if os.environ.get("CDSAM_TEST_ARTIFACTS"):
            shutil.copy(shot, Path(os.environ["CDSAM_TEST_ARTIFACTS"]) / "demo.png")

        # The same image and prompts through `cdsam predict`: the very same masks.
        with pytest.raises(SystemExit) as exc:
            cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(path), "--prompt",
                      prompts[0], "--prompt", prompts[1], "--out", str(tmp_path / "cli"),
                      "--no-overlay", "--no-progress", "--device", "cpu"])
        assert exc.value.code == 0
        for prompt in prompts:
            name = prompt.replace(" ", "-")
            cli_mask = np.asarray(Image.open(tmp_path / "cli" / f"upload__{name}.png")) > 0
            assert np.array_equal(page[f"mask__{name}.png"], cli_mask)

        # A click on the image joins the text as a foreground point.
        ActionChains(browser).move_to_element(shown).click().perform()
        text = wait.until(lambda d: re.search(r"1 foreground click: \((\d+), (\d+)\)",
                                              d.page_source))
        click = (float(text.group(1)), float(text.group(2)))
        assert 0 <= click[0] < 56 and 0 <= click[1] < 40
        browser.find_element(By.ID, "cdsam-run").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "cdsam-status"), "1 click"))
        href = next(a.get_attribute("href") for a in
                    browser.find_elements(By.CSS_SELECTOR, "#cdsam-files a[href]")
                    if a.get_attribute("href").endswith("mask__a-red-circle.png"))
        pred = load_model(ckpt).predict(path, prompts, points=[click])
        assert np.array_equal(_fetch(href), pred.masks[0])
    finally:
        demo.close()


@pytest.mark.slow
def test_demo_page_shows_objects_as_cdsam_predict_finds_them(browser, tmp_path):
    pytest.importorskip("gradio")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from cdsam.inference.demo import serve

    objects_ckpt = _checkpoint(tmp_path / "ckpt", min_quality=0.0)
    path = tmp_path / "upload.png"
    Image.fromarray(_image(40, 56)).save(path)
    prompts = ["a red circle", "a blue square"]
    demo, url = serve(objects_ckpt, port=_free_port(), device="cpu", block=False)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(url)
        wait.until(EC.presence_of_element_located(
            (By.CSS_SELECTOR, "#cdsam-image input[type=file]"))).send_keys(str(path))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#cdsam-image img")))
        box = browser.find_element(By.CSS_SELECTOR, "#cdsam-prompts textarea")
        box.clear()
        box.send_keys("\n".join(prompts))
        browser.find_element(By.CSS_SELECTOR, "#cdsam-objects input[type=checkbox]").click()
        browser.find_element(By.ID, "cdsam-run").click()
        status = wait.until(lambda d: re.search(r"(\d+) objects",
                                                d.find_element(By.ID, "cdsam-status").text))
        href = wait.until(lambda d: next((a.get_attribute("href") for a in d.find_elements(
            By.CSS_SELECTOR, "#cdsam-files a[href]")
            if a.get_attribute("href").endswith("instances.png")), False))
        with urllib.request.urlopen(href, timeout=30) as response:
            page_ids = np.asarray(Image.open(io.BytesIO(response.read())))
        with pytest.raises(SystemExit) as exc:
            cli.main(["predict", "--checkpoint", str(objects_ckpt), "--input", str(path), "--prompt",
                      prompts[0], "--prompt", prompts[1], "--out", str(tmp_path / "cli"),
                      "--instances", "--no-overlay", "--no-progress", "--device", "cpu"])
        assert exc.value.code == 0
        cli_ids = np.asarray(Image.open(tmp_path / "cli" / "upload__instances.png"))
        assert np.array_equal(page_ids, cli_ids)
        assert int(status.group(1)) == int(cli_ids.max()) > 0
    finally:
        demo.close()


def _fetch(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read()))) > 0


def test_a_taken_port_is_one_line(ckpt, capsys):  # noqa: F811
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--checkpoint", str(ckpt), "--port", str(port), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --port {port}: cannot serve on 127.0.0.1")
    assert err[0].endswith("pick another port")
