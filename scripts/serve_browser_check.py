"""Check the web page of `vlmspec serve` in a real headless Chromium: pick an image, ask, wait for the streamed
answer, check its tokens are coloured by source and τ is shown, check the browser logged no errors, and save a
screenshot (default docs/serve.png).

Needs Chromium and its driver from the OS packages and selenium from PyPI (not part of the test suite):

    apt-get install -y chromium chromium-driver && pip install -e ".[browser]"
    python scripts/serve_browser_check.py -- --target testbed --drafter testbed:flash

Everything after `--` goes to `vlmspec serve` (started on 127.0.0.1 by this script, stopped at the end).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from load import start_server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1000,700"]


def check_page(url: str, image: Path, prompt: str, screenshot: Path, chromium: str, driver_path: str) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='vlmspec-chromium-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: "context" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "image").send_keys(str(image.resolve()))
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 300).until(
            lambda b: any(word in b.find_element(By.CSS_SELECTOR, ".answer .stats").text for word in ("τ", "error")))
        stats = browser.find_element(By.CSS_SELECTOR, ".answer .stats").text
        spans = browser.find_elements(By.CSS_SELECTOR, ".answer .text span")
        colours = Counter(span.get_attribute("title") for span in spans)
        answer = browser.find_element(By.CSS_SELECTOR, ".answer .text").text
        browser.save_screenshot(str(screenshot))
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
    return {"stats": stats, "answer": answer, "token_sources": dict(colours), "browser_errors": errors}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else ["--target", "testbed", "--drafter", "testbed:flash"]
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=None, help="image to upload (default: the first describe-suite image)")
    parser.add_argument("--prompt", default="What is in this picture? Describe everything.")
    parser.add_argument("--screenshot", default="docs/serve.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args(own)
    image = Path(args.image) if args.image else first_suite_image()
    process, url = start_server(serve_args)
    try:
        report = check_page(url + "/", image, args.prompt, Path(args.screenshot), args.chromium, args.chromedriver)
    finally:
        process.terminate()
        process.wait(timeout=60)
    for key, value in report.items():
        print(f"{key}: {value}")
    problems = []
    if "τ" not in report["stats"]:
        problems.append(f"no τ shown: {report['stats']!r}")
    if not report["answer"].strip():
        problems.append("no answer text")
    if report["browser_errors"]:
        problems.append(f"browser errors: {report['browser_errors']}")
    if len(report["token_sources"]) < 2:
        problems.append(f"tokens are not coloured by more than one source: {report['token_sources']}")
    for problem in problems:
        print(f"serve_browser_check: FAIL: {problem}", file=sys.stderr)
    print(f"screenshot: {args.screenshot}")
    return 1 if problems else 0


def first_suite_image() -> Path:
    from vlmspec.bench.suites import read_suite
    from vlmspec.testbed.data import default_suite

    return read_suite(default_suite("describe"), "describe")[0].images[0]


if __name__ == "__main__":
    sys.exit(main())
