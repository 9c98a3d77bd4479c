"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium through Debian's
chromedriver (`make test` installs both; nothing is downloaded), against the shared server while
the unmodified SDK trains on it.

A user logs in with the form, sees the run appear while its client trains, opens it, watches its
loss curve gain points, and downloads a checkpoint through its link (a tar holding the adapter).
Then the scripted way in: a key in the URL fragment, taken out of the URL at once; and a key the
server refuses. The screenshot is kept in test-artifacts/ (TWINKLE_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.sdk import service

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("TWINKLE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
# What keeps Chromium off the network (this machine has none but loopback) and out of the way.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1600")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers online
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except Exception:  # noqa: BLE001 - the page is mid-redraw: a stale element, look again
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Trainer(threading.Thread):
    """An SDK client stepping a LoRA run until told to stop, then saving a checkpoint."""

    def __init__(self, server: Any, key: str) -> None:
        super().__init__(daemon=True)
        self.server, self.key = server, key
        self.model_id: str | None = None
        self.checkpoint: str | None = None
        self.steps = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from tinker import types

        try:
            with service(self.server, self.key) as sc:
                tc = sc.create_lora_training_client("tiny-qwen3", rank=4, seed=1).result()
                self.model_id = tc.model_id
                tokens = list(range(10, 42))
                datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(31, np.float32)})
                while not self.stop.is_set() and self.steps < 300:
                    tc.forward_backward([datum], "cross_entropy").result()
                    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
                    self.steps += 1
                    time.sleep(0.15)  # a pace the page can watch
                self.checkpoint = tc.save_state("from-the-dashboard").result().path
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def curve_points(browser: Any) -> int:
    return int(browser.find_element("id", "curve").get_attribute("data-points") or 0)


def test_a_user_watches_a_run_train_and_downloads_its_checkpoint(server: Any, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    key = f"tml-dashboard-{uuid.uuid4().hex[:12]}"
    browser.get(server.base_url + "/dashboard")
    wait_for(lambda: browser.find_element(By.ID, "login-panel").is_displayed(), "the login form")
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "login-button").click()
    wait_for(lambda: browser.find_element(By.ID, "app").is_displayed(), "the dashboard after logging in")
    assert browser.find_element(By.ID, "viewer").text.startswith("tenant ")

    trainer = Trainer(server, key)
    trainer.start()
    try:
        wait_for(lambda: trainer.model_id or trainer.error, "the client's training run")
        assert trainer.error is None, trainer.error
        row = f'#runs tr[data-model-id="{trainer.model_id}"]'
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, row), "the run in the runs table")
        browser.find_element(By.CSS_SELECTOR, row).click()
        first = wait_for(lambda: curve_points(browser) >= 2 and curve_points(browser), "two points on the curve")
        wait_for(lambda: curve_points(browser) >= first + 3, "the curve to gain points while the client trains")
        assert browser.find_element(By.ID, "metric").get_attribute("value") == "loss per token"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#curve circle.point")) == curve_points(browser)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    finally:
        trainer.stop.set()
        trainer.join(timeout=120)
    assert trainer.error is None, trainer.error and trainer.checkpoint

    link = f'a.download[data-path="{trainer.checkpoint}"]'
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, link), "the checkpoint's download link")
    browser.find_element(By.CSS_SELECTOR, link).click()
    downloads = tmp_path / "downloads"
    tar_path = wait_for(lambda: next((p for p in downloads.glob("*.tar")), None), "the downloaded checkpoint")
    wait_for(lambda: not list(downloads.glob("*.crdownload")), "the download to finish")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert any(n.startswith("adapter_model") for n in names) and "adapter_config.json" in names, names


def test_a_key_in_the_fragment_logs_in_and_leaves_the_url(server: Any, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.base_url + "/dashboard#key=tml-fragment-" + uuid.uuid4().hex[:8])
    wait_for(lambda: browser.find_element(By.ID, "app").is_displayed(), "the dashboard from a fragment key")
    assert "key=" not in browser.current_url
    browser.find_element(By.ID, "logout").click()
    wait_for(lambda: browser.find_element(By.ID, "login-panel").is_displayed(), "the login form after logging out")
    assert browser.execute_script("return sessionStorage.length") == 0

    browser.find_element(By.ID, "key").send_keys("not-a-tinker-key")
    browser.find_element(By.ID, "login-button").click()
    wait_for(lambda: "not accepted" in browser.find_element(By.ID, "login-error").text, "the refusal")
    assert not browser.find_element(By.ID, "app").is_displayed()
