"""The web page in headless Chromium: a person picks a radiograph and sees the 14 probabilities."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from cxrfusion.inference.classifier import Classifier
from cxrfusion.labels import LABELS
from cxrfusion.serving import ServeSettings, create_app
from cxrfusion.serving.server import background_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60


@pytest.fixture(scope="module")
def classifier(mc_dropout_run) -> Classifier:
    return Classifier.load(mc_dropout_run, mc_samples=10)


@pytest.fixture(scope="module")
def page_url(classifier) -> str:
    with background_server(create_app(classifier, ServeSettings())) as url:
        yield url


def _find(tool: Path) -> str | None:
    return str(tool) if tool.exists() else shutil.which(tool.name)


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _find(CHROMIUM), _find(CHROMEDRIVER)
    if chromium is None or chromedriver is None:
        missing = CHROMIUM.name if chromium is None else CHROMEDRIVER.name
        pytest.skip(f"{missing} not found (Debian packages chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1300"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    yield driver
    driver.quit()


def _choose(browser, file: Path) -> None:
    browser.find_element(By.ID, "file").send_keys(str(file))


def test_page_shows_the_14_probabilities_the_flag_and_the_heatmap(
    browser, page_url, classifier, nih_sample, tmp_path
):
    image = sorted((nih_sample / "images").glob("*.png"))[0]
    browser.get(page_url + "/")
    WebDriverWait(browser, WAIT_S).until(
        lambda b: "architecture" in b.find_element(By.ID, "card-json").get_attribute("textContent")
    )
    _choose(browser, image)
    rows = WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#probs tbody tr") or False
    )
    assert [row.get_attribute("data-label") for row in rows] == list(LABELS)
    values = [float(row.find_element(By.CSS_SELECTOR, ".value").text) for row in rows]
    expected = classifier.predict(image)  # the server's answer: same seed, batch 0
    assert values == pytest.approx(expected.probability, abs=5e-4)  # shown with 3 decimals
    flag = browser.find_element(By.ID, "flag")
    assert flag.get_attribute("data-flag") == str(expected.flag).lower()
    assert flag.text.startswith(
        "Review recommended" if flag.get_attribute("data-flag") == "true" else "No review flag"
    )
    assert "Grad-CAM" in browser.find_element(By.ID, "view-caption").text
    assert image.name in browser.find_element(By.ID, "status").text
    screenshot = tmp_path / "web_page.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_page_shows_the_servers_message_for_a_file_that_is_not_an_image(
    browser, page_url, tmp_path
):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    browser.get(page_url + "/")
    _choose(browser, text_file)
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, WAIT_S).until(lambda _: "error" in status.get_attribute("class"))
    assert "not a PNG, JPEG or DICOM image" in status.text
