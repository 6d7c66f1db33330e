"""The status page at ``GET /``: in-process (the files, the CSP, what the server refuses to a
browser), then a real daemon driven by headless chromium over a loopback TCP listener with a token.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``make setup`` installs them
when it runs as root) and ``selenium`` (the test extra); without them it is skipped, saying why.
``TTSD_SCREENSHOT=docs/status-page.png`` makes it save the README's screenshot on the way.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from conftest import plausible, save_tiny_vits
from daemon_util import Daemon, start_daemon
from inproc import FakeVoices, FrontEnds

VOICES = {"joe": {"1": {"tone": 330}, "2": {"tone": 440}}}
TOKEN = "a-token-of-twenty-chars"
# Three sentences: the voice streams each as it is made, so the page hears the first long before the end.
SPOKEN = "Hello from the status page. This is the second sentence. And here is a third one, a little longer."


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[FrontEnds]:
    """Front ends whose TCP listener needs ``TOKEN`` (the Unix socket never does)."""
    voices = FakeVoices(tmp_path, VOICES, token=TOKEN)
    front = FrontEnds(voices.backend, tmp_path)
    yield front
    front.close()
    voices.close()


def raw_get(front: FrontEnds, target: str) -> bytes:
    """A GET with the path sent exactly as given (HTTP clients normalize ``..`` away), on the
    front ends' loop (which runs only while a test drives it)."""
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(front.host, front.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return reply
    return front.run(go())


def test_the_page_and_its_files_are_served_with_a_strict_csp(guarded: FrontEnds) -> None:
    """1. ``/`` and its two files answer on the socket and, without the token, on TCP: they carry
    no data. 2. Each has the CSP and is the package's file. 3. Nothing else is reachable through
    ``/static/`` (``..``, encoded or not; unknown names), and the API still needs the token."""
    package = resources.files("ttsd.front") / "page"
    for tcp in (False, True):
        page = guarded.get("/", tcp=tcp)
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert page.body == (package / "index.html").read_bytes()
        for name, kind in (("page.css", "text/css"), ("page.js", "text/javascript")):
            reply = guarded.get(f"/static/{name}", tcp=tcp)
            assert reply.status == 200 and reply.headers["Content-Type"].startswith(kind), name
            assert reply.body == (package / name).read_bytes()
            assert reply.headers["Content-Security-Policy"] == page.headers["Content-Security-Policy"]
        csp = page.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert b'name="viewport"' in page.body and b"http" not in page.body.replace(b"http-equiv", b"")
    script = (package / "page.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|eval\(", script)
    for target in ("/static/../page.py", "/static/..%2fpage.py", "/static/%2e%2e/page.py", "/static/nope.js",
                   "/static/", "/static/index.html", "/page.py", "/static/page.js/x"):
        reply = raw_get(guarded, target)
        assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 404 Not Found", b"HTTP/1.1 401 Unauthorized"), target
        assert b"import" not in reply, target
    assert guarded.get("/v1/status", tcp=True).status == 401
    assert guarded.post("/", {}, tcp=True).status == 401  # only GET is public


def test_status_says_whether_this_listener_takes_control(guarded: FrontEnds, tmp_path: Path) -> None:
    """The page shows rollback/activate only where ``"control"`` is true: the socket always, TCP
    only with a token configured (and sent: without it there is no status at all)."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.get("/v1/status").json()["control"] is True
    assert guarded.get("/v1/status", tcp=True, headers=bearer).json()["control"] is True
    open_voices = FakeVoices(tmp_path / "open", VOICES)
    front = FrontEnds(open_voices.backend, tmp_path / "open")
    try:
        assert front.get("/v1/status", tcp=True).json()["control"] is False
        assert front.get("/v1/status").json()["control"] is True
    finally:
        front.close()
        open_voices.close()


def test_control_routes_refuse_other_web_pages(tmp_path: Path) -> None:
    """Cross-site request forgery and DNS rebinding, on the socket (as behind socat or an SSH
    tunnel, where control needs no token): 1. a form or fetch from another origin is refused,
    whatever it sends; 2. so is any body a form can send; 3. a browser naming the host by a DNS
    name is refused everything; 4. the page's own calls and curl-like clients are served."""
    voices = FakeVoices(tmp_path, VOICES)
    front = FrontEnds(voices.backend, tmp_path)
    json_type = {"Content-Type": "application/json"}
    try:
        path = "/v1/voices/joe/rollback"
        for headers, code in [
            ({"Origin": "http://evil.example", **json_type}, "cross_origin"),
            ({"Origin": "null"}, "cross_origin"),
            ({"Origin": "http://localhost:8081", "Host": "localhost:8080"}, "cross_origin"),
            ({"Sec-Fetch-Site": "cross-site"}, "cross_origin"),
            ({"Sec-Fetch-Site": "same-site"}, "cross_origin"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, "unsupported_media_type"),
            ({"Content-Type": "multipart/form-data; boundary=x"}, "unsupported_media_type"),
            ({"Content-Type": "text/plain"}, "unsupported_media_type"),
        ]:
            reply = front.post(path, {}, headers=headers)
            assert reply.error["code"] == code, headers
            assert reply.status in (403, 415)
        for headers in ({"Host": "rebound.example:8080", "Sec-Fetch-Site": "same-origin"},
                        {"Host": "rebound.example", "Origin": "http://rebound.example"}):
            assert front.get("/v1/status", headers=headers).error["code"] == "forbidden_host"
            assert front.post(path, {}, headers={**headers, **json_type}).error["code"] == "forbidden_host"
        assert voices.rollbacks == []
        page_like = {"Origin": "http://localhost:8080", "Host": "localhost:8080", "Sec-Fetch-Site": "same-origin"}
        assert front.post(path, {}, headers={**page_like, **json_type}).status == 200
        assert front.post(path, {}, headers={"Host": "[::1]:8080", "Origin": "https://[::1]:8080", **json_type}).status == 200
        assert front.post(path).status == 200  # curl -X POST: no body, no type
        assert front.post(path, {}, headers=json_type).status == 200  # ttsd rollback
        assert front.get("/v1/status", headers={"Host": "127.0.0.1:8080", "Sec-Fetch-Site": "none"}).status == 200
        assert len(voices.rollbacks) == 4
    finally:
        front.close()
        voices.close()


# -- the real thing in chromium --------------------------------------------------------------------

def _browser() -> Any:
    """A headless chromium through Debian's chromedriver, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", "--window-size=800,1100", "--mute-audio"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def active(d: Daemon, voice: str) -> str:
    return str({v["name"]: v for v in d.request("GET", "/v1/voices").json()["voices"]}[voice]["active"])


@pytest.mark.daemon
def test_the_page_in_chromium(tmp_path: Path, cache_dir: Path) -> None:
    """A real daemon on 127.0.0.1 with --token-file, and the page in headless chromium:
    1. without the token the page shows nothing of the daemon and no control buttons;
    2. with it, the voice and its version are listed and the buttons appear;
    3. Speak streams: the page schedules Web Audio as the PCM arrives, the first piece before
       the answer has ended, and then holds the whole as a WAV (the <audio> element plays it);
    4. v2 dropped into the models dir shows up, active, without the page reloading;
    5. Roll back from the page serves v1 again, and the audit trail shows it;
    6. with a wrong token, Activate v2 is refused (the error is shown) and v1 still serves."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()  # before the daemon: a skip starts nothing
    models = tmp_path / "models"
    save_tiny_vits(models / "tiny-1", version="1", edit=plausible, noise_scale_duration=0.0)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    d = start_daemon(tmp_path, cache_dir, "--no-seed", "--settle", "0.2", "--listen", f"127.0.0.1:{port}",
                     "--token-file", str(token_file), "--workers", "1", "--threads", "1")
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)

    def text(css: str) -> str:
        # read in one script: the page re-renders its lists every poll, and an element found by
        # one WebDriver call may be gone by the next (StaleElementReferenceException)
        return str(browser.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText).join('\\n')", css))

    def shown_active() -> str:
        return text('[data-voice="tiny"] .active-version')

    try:
        browser.get(f"http://127.0.0.1:{port}/")
        # 1.
        wait.until(lambda b: b.find_element(By.ID, "auth").is_displayed())
        assert "token needed" in text("#live")
        assert browser.find_elements(By.CSS_SELECTOR, "[data-voice]") == []
        assert browser.find_elements(By.CSS_SELECTOR, "#voices button") == []
        assert TOKEN not in browser.page_source
        # 2.
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-use").click()
        wait.until(lambda b: shown_active() == "1")
        assert text("#voice option") == "tiny"
        assert "Roll back" in text('[data-voice="tiny"] button')
        browser.execute_script("window.notReloaded = true")
        # 3.
        browser.find_element(By.ID, "text").clear()
        browser.find_element(By.ID, "text").send_keys(SPOKEN)
        browser.find_element(By.ID, "speak").click()
        wait.until(lambda b: b.find_element(By.ID, "speak-info").get_attribute("data-state") is not None)
        spoke = browser.execute_script("return Object.assign({}, document.getElementById('speak-info').dataset)")
        assert spoke["state"] == "done", text("#speak-info")
        assert "tiny 1:" in text("#speak-info") and "first audio after" in text("#speak-info")
        heard = int(spoke["bytes"]) / 2 / int(spoke["rate"])
        assert heard > 1.0 and float(spoke["scheduled"]) == pytest.approx(heard, abs=1e-3)  # all of it, on Web Audio
        # streamed: the first piece was on its way to the speakers before the answer ended, and it
        # was a piece of the first sentence, not the whole answer in one read
        assert int(spoke["chunks"]) >= 3 and float(spoke["firstAudio"]) < float(spoke["total"]), spoke
        assert int(spoke["firstBytes"]) < int(spoke["bytes"]) / 3, spoke
        wait.until(lambda b: b.execute_script("const a = document.getElementById('audio');"
                                              "return a.readyState >= 1 && a.duration > 0"))
        saved = browser.execute_script("return document.getElementById('audio').duration")
        assert saved == pytest.approx(heard, abs=0.01)  # the WAV holds what was streamed
        assert browser.find_element(By.ID, "speak-save").is_displayed()
        # 4.
        save_tiny_vits(tmp_path / "stage2", version="2", seed=2, edit=plausible, noise_scale_duration=0.0)
        os.rename(tmp_path / "stage2", models / "tiny-2")
        wait.until(lambda b: shown_active() == "2")
        assert browser.execute_script("return window.notReloaded") is True
        # 5.
        browser.find_element(By.CSS_SELECTOR, '[data-voice="tiny"] .voice-head button').click()
        wait.until(lambda b: shown_active() == "1")
        assert active(d, "tiny") == "1"
        assert "rollback of tiny: tiny 2 → 1" in text("#message")
        wait.until(lambda b: "rollback" in text("#history tbody tr:first-child"))
        if os.environ.get("TTSD_SCREENSHOT"):  # the README's picture: the whole page, 800 px wide
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(800, height + 120)
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(os.environ["TTSD_SCREENSHOT"])
        # 6.
        browser.find_element(By.ID, "token-drop").click()
        wait.until(lambda b: b.find_element(By.ID, "auth").is_displayed())
        browser.find_element(By.ID, "token").send_keys("a-wrong-token-of-twenty")
        browser.find_element(By.ID, "token-use").click()
        wait.until(lambda b: "the token was refused" in text("#message"))
        browser.find_element(By.CSS_SELECTOR, '[data-voice="tiny"] tr[data-version="2"] button').click()
        wait.until(lambda b: "activation of tiny 2 refused: 401 unauthorized" in text("#message"))
        assert active(d, "tiny") == "1"
        assert shown_active() == "1"
    finally:
        browser.quit()
        assert d.stop() == 0, d.logs()


HOSTILE = '<img src=x onerror="window.pwned=1">'


@contextmanager
def _served(backend: Any, tmp_path: Path) -> Iterator[FrontEnds]:
    """The front ends on a loop thread of their own, as the daemon runs them, for a browser to load."""
    front = FrontEnds(backend, tmp_path)
    server = threading.Thread(target=front.loop.run_forever, daemon=True)
    server.start()
    try:
        yield front
    finally:
        front.loop.call_soon_threadsafe(front.loop.stop)
        server.join(10)
        front.close()


@pytest.mark.slow
def test_hostile_status_is_shown_as_text_on_a_phone(tmp_path: Path) -> None:
    """Reasons, folder names and audit entries come from model folders and are hostile: on a
    phone-sized headless chromium, 1. they appear as text and run nothing; 2. the page is no
    wider than the screen (wide tables scroll inside their box)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    voices = FakeVoices(tmp_path, VOICES)

    def status() -> dict[str, Any]:
        version = {"version": "3", "state": "refused", "reason": HOSTILE, "served": 0, "model_failures": 0}
        return {**voices.status(), "uptime": 3725.0, "folders": [{"folder": f"/models/{HOSTILE}",
                                                                  "state": "refused", "reason": HOSTILE}],
                "voices": [{"name": "joe", "active": "2", "default": True, "versions": [version]}],
                "history": [{"time": "2026-01-01T00:00:00", "voice": "joe", "from": "2", "to": "3",
                             "why": HOSTILE, HOSTILE: HOSTILE}]}

    try:
        with _served(replace(voices.backend, status=status), tmp_path) as front:
            browser.set_window_size(390, 844)
            browser.get(f"http://127.0.0.1:{front.port}/")
            WebDriverWait(browser, 30).until(lambda b: "refused" in b.find_element(By.ID, "voices").text)
            for where in ("voices", "folders", "history"):
                assert HOSTILE in browser.find_element(By.ID, where).text, where
            assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
            assert browser.execute_script("return window.pwned") is None
            assert "1h 2m" in browser.find_element(By.ID, "summary").text
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            if os.environ.get("TTSD_PHONE_SCREENSHOT"):
                browser.save_screenshot(os.environ["TTSD_PHONE_SCREENSHOT"])
    finally:
        browser.quit()
        voices.close()


@pytest.mark.slow
def test_speak_without_web_audio_plays_the_wav(tmp_path: Path) -> None:
    """A browser that refuses Web Audio (here: no AudioContext at all) still speaks: 1. the PCM
    is read to its end and nothing is scheduled; 2. the whole of it becomes the WAV that the
    <audio> element plays, and the save link offers it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": "delete window.AudioContext; delete window.webkitAudioContext;"})
    voices = FakeVoices(tmp_path, VOICES)
    try:
        with _served(voices.backend, tmp_path) as front:
            browser.get(f"http://127.0.0.1:{front.port}/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: b.find_element(By.ID, "voice").get_attribute("value") == "joe")
            assert browser.execute_script("return window.AudioContext") is None
            browser.find_element(By.ID, "speak").click()
            wait.until(lambda b: b.find_element(By.ID, "speak-info").get_attribute("data-state") is not None)
            spoke = browser.execute_script("return Object.assign({}, document.getElementById('speak-info').dataset)")
            # 1.
            assert spoke["state"] == "done" and "scheduled" not in spoke and "firstAudio" not in spoke, spoke
            # 2.
            heard = int(spoke["bytes"]) / 2 / int(spoke["rate"])
            wait.until(lambda b: b.execute_script("const a = document.getElementById('audio');"
                                                  "return a.readyState >= 1 && a.duration > 0"))
            assert browser.execute_script("return document.getElementById('audio').duration") == pytest.approx(heard, abs=0.01)
            wait.until(lambda b: b.execute_script("const a = document.getElementById('audio');"
                                                  "return !a.paused || a.ended"))
            assert browser.find_element(By.ID, "speak-save").get_attribute("href").startswith("blob:")
    finally:
        browser.quit()
        voices.close()
