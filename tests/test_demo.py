"""`peft-tagi demo`: the Gradio page served on 127.0.0.1 by a real `peft-tagi demo` process, driven through
`gradio_client` and through a real headless browser (Debian's chromium + chromium-driver, via selenium)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import quickstart_like_folder

from peft_tagi.predict import QUICKSTART_EXAMPLES

pytest.importorskip("gradio", reason='the demo needs the [demo] extra: pip install -e ".[demo]"')

INSTRUCTION = "reverse the words in French"  # "in" and "French" are outside the tiny tokenizer's vocabulary
INPUTS = "cat dog sun\nred tree"
MAX_NEW_TOKENS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """A `peft-tagi demo` process on the quickstart-like folder (its defaults), until the module's tests end."""
    root = tmp_path_factory.mktemp("demo")
    quickstart_like_folder(root)
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONWARNINGS="ignore")
    log = root / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peft_tagi.cli", "demo", "--port", str(port), "--max-new-tokens",
             str(MAX_NEW_TOKENS)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # the machine is busy: loading gradio and the model can take a while
        while f"demo running at {url}" not in log.read_text():
            if proc.poll() is not None:
                pytest.fail(f"peft-tagi demo exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"peft-tagi demo did not start within 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_demo_answers_through_gradio_client(demo_url, tmp_path):
    from gradio_client import Client

    from peft_tagi import TaskAdapter

    client = Client(demo_url, verbose=False)
    tagi_outputs, base_outputs, warnings, archive = client.predict(INSTRUCTION, INPUTS, api_name="/generate")
    tagi_lines, base_lines = tagi_outputs.splitlines(), base_outputs.splitlines()
    assert len(tagi_lines) == len(base_lines) == 2
    assert all(len(line.split()) == MAX_NEW_TOKENS for line in tagi_lines + base_lines)
    assert tagi_lines != base_lines  # the adapter changes the frozen base model's outputs
    assert "read as &lt;unk&gt;: 'in', 'French'" in warnings and "closed, word-level vocabulary" in warnings

    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path)
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    adapter = TaskAdapter.load(folder)
    assert adapter.instruction == INSTRUCTION and adapter.instruction_states is not None
    assert "library_name: peft" in (folder / "README.md").read_text()

    known = client.predict("reverse the words", "cat dog", api_name="/generate")
    assert known[2] == "No unknown words."


def _browser_paths() -> tuple[str, str]:
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "no headless browser here: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver; .ci/run does)"
        )
    return browser, driver


def test_demo_page_in_a_headless_browser(demo_url, tmp_path):
    browser, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    # An explicit driver path: selenium never tries to download one (Selenium Manager stays idle).
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(demo_url)
        wait = WebDriverWait(driver, 120)
        instruction = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#instruction textarea"))
        instruction.send_keys(INSTRUCTION)
        driver.find_element(By.CSS_SELECTOR, "#inputs textarea").send_keys("cat dog sun")
        driver.find_element(By.CSS_SELECTOR, "#run").click()

        def output(d):
            value = d.find_element(By.CSS_SELECTOR, "#tagi-outputs textarea").get_attribute("value")
            return value if value and value.strip() else None

        text = wait.until(output)
        assert len(text.split()) == MAX_NEW_TOKENS
        base = driver.find_element(By.CSS_SELECTOR, "#base-outputs textarea").get_attribute("value")
        assert len(base.split()) == MAX_NEW_TOKENS
        screenshot = tmp_path / "demo.png"
        assert driver.save_screenshot(str(screenshot))
        assert Path(screenshot).stat().st_size > 10_000
        # The whole warning shows, "<unk>" included (unescaped, Markdown would swallow it as an HTML tag).
        wait.until(lambda d: "read as <unk>: 'in', 'French'" in d.find_element(By.CSS_SELECTOR, "#warnings").text)

        # With the quickstart's model the page offers two-step examples: a click fills both boxes.
        [(example, inputs, _), *_] = QUICKSTART_EXAMPLES
        driver.find_element(By.CSS_SELECTOR, '#examples [data-testid="dataset-cell-0-0"]').click()
        value = lambda d, box: d.find_element(By.CSS_SELECTOR, f"#{box} textarea").get_attribute("value")  # noqa: E731
        wait.until(lambda d: value(d, "instruction") == example)
        assert value(driver, "inputs") == "\n".join(inputs)
    finally:
        driver.quit()
