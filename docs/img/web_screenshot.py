"""Make docs/img/web.png: the web page serving a model, a sample restored (side by side) and an adapter
made from the sample pairs. Needs chromium and chromium-driver (Debian) and the dev extra.

    python docs/img/web_screenshot.py CHECKPOINT_OR_MODEL_URI docs/img/web.png
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time

import ray
from PIL import Image
from ray import serve
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from serving.app import build_app

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1060,1900")


def page_state(driver, key: str) -> str | None:
    return driver.execute_script(f"return document.body.dataset.{key};")


def main(model: str, out: str, sample: int = 2) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "num_cpus": 0.5}), name="screenshot", route_prefix="/")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 60).until(lambda d: "version" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "sample-pairs").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pairs .pair")) == 3)
        driver.find_element(By.ID, "adapt-button").click()
        WebDriverWait(driver, 300).until(lambda d: page_state(d, "adapter") == "done")
        button = driver.find_elements(By.CSS_SELECTOR, "#samples button")[sample]
        name = button.text.split(" (")[0].replace(" ", "-") + ".png"
        button.click()
        WebDriverWait(driver, 60).until(lambda d: f"{name}: ready" in d.find_element(By.ID, "restore-state").text)
        driver.execute_script("document.getElementById('adapter-select').value = '';")
        driver.find_element(By.ID, "restore-button").click()
        WebDriverWait(driver, 300).until(lambda d: page_state(d, "restore") == "done")
        driver.find_element(By.ID, "side-by-side").click()
        time.sleep(0.5)
        driver.save_screenshot(out)
    finally:
        driver.quit()
        serve.shutdown()
        ray.shutdown()
    image = Image.open(out).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, 1480)))
    image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.LANCZOS).save(out, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
