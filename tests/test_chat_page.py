"""The chat page at `/`, driven in a real headless Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from live_server import MODEL, metric, running_server, wait_idle
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background connections fail on a machine without internet; these flags keep it quiet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parent.parent / "outputs" / "screenshots"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Browser:
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install -y chromium (see the README's test command)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    with running_server(None, tmp_path_factory.mktemp("chat-page")) as url:  # the embedded SmolLM2
        yield url


def open_page(browser: Browser, url: str, **context) -> Page:
    page = browser.new_context(**context).new_page()
    page.goto(f"{url}/")
    return page


def set_field(page: Page, selector: str, value: str) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    page.fill(selector, value)


def ask(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


WATCH_ANSWER = """() => {
    window.__snapshots = [];
    new MutationObserver(() => {
        const bodies = document.querySelectorAll('.msg.assistant .body');
        const last = bodies[bodies.length - 1];
        if (last) window.__snapshots.push(last.textContent);
    }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


def test_page_streams_an_answer_with_its_figures(browser, smollm2_server):
    page = open_page(browser, smollm2_server)
    expect(page.locator("#model")).to_have_text(MODEL)
    expect(page.locator("#settings")).to_be_hidden()
    page.click("#settings-toggle")
    expect(page.locator("#key-row")).to_be_hidden()  # this server needs no key
    page.evaluate(WATCH_ANSWER)
    set_field(page, "#max-tokens", "40")
    set_field(page, "#temperature", "0")
    ask(page, "Write a short poem about the sea.")
    stats = page.locator(".msg.assistant .stats")
    expect(stats).to_contain_text("completion tokens", timeout=120_000)
    text = page.locator(".msg.assistant .body").inner_text()
    assert len(text) > 20
    snapshots = [s for s in dict.fromkeys(page.evaluate("window.__snapshots")) if s]
    assert len(snapshots) > 2, f"the answer should appear piece by piece, saw {len(snapshots)} states"
    assert all(text.startswith(s.strip()[:10]) for s in snapshots[1:]), "each state should extend the answer"
    figures = stats.inner_text()
    assert "first token" in figures and "tok/s" in figures and "40 completion tokens" in figures
    expect(page.locator(".msg.user")).to_have_text("Write a short poem about the sea.")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat-desktop.png"), full_page=True)
    assert (SCREENSHOTS / "chat-desktop.png").stat().st_size > 10_000

    # A follow-up sends the conversation so far; New chat forgets it.
    ask(page, "Now make it rhyme.")
    expect(page.locator(".msg.assistant .stats")).to_have_count(2, timeout=120_000)
    expect(page.locator(".msg.assistant").nth(1).locator(".stats")).to_contain_text("completion tokens")
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)


def test_stop_aborts_the_stream_and_frees_the_kv_pages(browser, smollm2_server):
    page = open_page(browser, smollm2_server)
    expect(page.locator("#model")).to_have_text(MODEL)
    set_field(page, "#max-tokens", "2000")
    ask(page, "Count from 1 to 1000, one number per line.")
    body = page.locator(".msg.assistant .body")
    page.wait_for_function("document.querySelector('.msg.assistant .body').textContent.length > 10", timeout=120_000)
    assert metric(smollm2_server, "engine_requests_running") == 1
    page.click("#stop")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    wait_idle(smollm2_server)  # running, waiting and used KV pages all back to 0
    partial = body.inner_text()
    page.wait_for_timeout(1000)
    assert body.inner_text() == partial, "nothing arrives after Stop"


def test_phone_sized_viewport_fits_the_page(browser, smollm2_server):
    page = open_page(browser, smollm2_server, viewport={"width": 390, "height": 844}, is_mobile=True,
                     device_scale_factor=2)  # fmt: skip
    expect(page.locator("#model")).to_have_text(MODEL)
    set_field(page, "#max-tokens", "12")
    page.click("#settings-toggle")  # closed again: the conversation gets the room
    ask(page, "Hello!")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("completion tokens", timeout=120_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling on a phone"
    for selector in ("#prompt", "#send", "#stop", "#new-chat", ".msg.assistant"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page.screenshot(path=str(SCREENSHOTS / "chat-phone.png"))


def test_model_output_is_rendered_as_text_never_html(browser, smollm2_server):
    page = open_page(browser, smollm2_server)
    text = 'Try <img src=x onerror="window.pwned=1"> this:\n\n```python\nprint("<b>hi</b>")\n```\nDone.'
    rendered = page.evaluate(
        """(text) => {
        const div = document.createElement('div');
        renderBody(div, text);
        return {html: div.innerHTML, imgs: div.querySelectorAll('img, b').length,
                code: div.querySelector('pre code') && div.querySelector('pre code').textContent,
                paragraphs: [...div.querySelectorAll('p')].map(p => p.textContent)};
    }""",
        text,
    )
    assert rendered["imgs"] == 0 and "&lt;img" in rendered["html"]
    assert rendered["code"] == 'print("<b>hi</b>")\n'
    assert rendered["paragraphs"] == ['Try <img src=x onerror="window.pwned=1"> this:', "Done."]
    assert page.evaluate("window.pwned") is None


def test_errors_and_the_api_key_prompt_are_shown(browser, tiny_qwen3, tmp_path):
    with running_server(tiny_qwen3, tmp_path, "server.api_key=sesame") as url:
        page = open_page(browser, url)
        expect(page.locator(".msg.error")).to_contain_text("needs an API key")
        expect(page.locator("#key-row")).to_be_visible()
        page.fill("#api-key", "wrong")
        page.click("#save-key")
        expect(page.locator(".msg.error").last).to_contain_text("Error 401")
        page.fill("#api-key", "sesame")
        page.click("#save-key")
        expect(page.locator("#model")).to_have_text(MODEL)
        set_field(page, "#max-tokens", "100000")  # more than the context: the server answers 400
        ask(page, "Hi")
        expect(page.locator(".msg.error").last).to_contain_text("Error 400")
        expect(page.locator(".msg.error").last).to_contain_text("max_tokens")
        set_field(page, "#max-tokens", "4")
        ask(page, "Hi")
        expect(page.locator(".msg.assistant .stats")).to_contain_text("4 completion tokens", timeout=60_000)
