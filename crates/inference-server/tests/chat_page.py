#!/usr/bin/env python3
# SPDX-License-Identifier: EUPL-1.2
"""The chat page in headless Chromium (Debian's chromium and chromedriver,
driven by selenium): type a message, see the streamed answer and the
tokens/s, then press stop in the middle of a slow answer. The server (started
by tests/chat_page.rs) serves a scripted model that answers `WORDS` one word
every 40 ms. Exits non-zero on the first failure."""

import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

base, full = sys.argv[1], sys.argv[2]

opts = webdriver.ChromeOptions()
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    opts.add_argument(a)
opts.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
wait = WebDriverWait(driver, 60)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def answers():
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant:not(.reasoning)")]


try:
    driver.get(base + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("model:"))
    check(driver.find_element(By.ID, "model").text == "model: slow", "the page names the model")

    # The scripted model is greedy by nature: temperature 0.
    driver.find_element(By.ID, "temperature").send_keys("0")
    box = driver.find_element(By.ID, "input")
    box.send_keys("hello")
    box.send_keys(Keys.ENTER)
    # Streamed: the answer grows before it is whole.
    wait.until(lambda d: len(answers()) == 1 and answers()[0] != "")
    partial = answers()[0]
    check(partial != full, f"the answer streams in ({partial!r} first)")
    wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "status").text)
    check(answers()[0] == full, "the whole answer arrives")
    status = driver.find_element(By.ID, "status").text
    check(status.startswith(f"{len(full.split())} tokens"), f"tokens and speed shown: {status}")

    box.send_keys("again")
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: len(answers()) == 2 and len(answers()[1].split()) >= 3)
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
    time.sleep(0.5)
    stopped = answers()[1]
    check(len(stopped.split()) < len(full.split()), f"stop cuts the answer ({len(stopped.split())} words)")
    time.sleep(0.5)
    check(answers()[1] == stopped, "nothing arrives after stop")
    check(driver.find_element(By.ID, "send").is_enabled(), "the page is ready again")
finally:
    driver.quit()
print("all passed")
