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
    1. without the token the page shows only the public health (up, ready), control locked, and
       no control buttons;
    2. with it, the voice and its version are listed; no Roll back while there is nothing to go
       back to;
    3. Speak streams: the page schedules Web Audio as the PCM arrives, the first piece before
       the answer has ended, and then holds the whole as a WAV (the <audio> element plays it);
    4. v2 dropped into the models dir shows up, active, without the page reloading;
    5. Roll back from the page asks first, then serves v1 again, and the audit trail shows it;
    6. with the token forgotten and a wrong one given, the page is locked again, says so, and
       offers no control; v1 still serves."""
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
        wait.until(lambda b: b.find_element(By.ID, "auth").is_displayed() and text("#ready").startswith("ready"))
        assert "locked" in text("#live") and "up" in text("#health") and "locked" in text("#lock")
        assert browser.find_elements(By.CSS_SELECTOR, "[data-voice]") == []
        assert browser.find_elements(By.CSS_SELECTOR, "#voices button") == []
        assert TOKEN not in browser.page_source
        # 2.
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-use").click()
        wait.until(lambda b: shown_active() == "1")
        assert text("#voice option") == "tiny"
        assert "Roll back" not in text('[data-voice="tiny"] button')  # nothing to go back to
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
        wait.until(lambda b: "Roll back" in text('[data-voice="tiny"] .voice-head button'))
        browser.find_element(By.CSS_SELECTOR, '[data-voice="tiny"] .voice-head button').click()
        wait.until(lambda b: b.find_element(By.ID, "confirm").is_displayed())
        assert "serves version 2 now" in text("#confirm") and text("#confirm-yes") == "Roll back to 1"
        browser.find_element(By.ID, "confirm-yes").click()
        wait.until(lambda b: shown_active() == "1")
        assert active(d, "tiny") == "1"
        assert "rollback of tiny: tiny now serves 1 (was 2)" in text("#message")
        wait.until(lambda b: "rolled back from 2 to 1" in text("#history tbody tr:first-child"))
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
        assert "locked" in text("#live") and not browser.find_element(By.ID, "voices").is_displayed()
        assert browser.find_elements(By.CSS_SELECTOR, "[data-voice]") == []  # forgotten, not just hidden
        assert active(d, "tiny") == "1"
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


# -- before the token, rollback, a phone: the page against status the test writes ----------------

SIGNER = "release-2026 (0123456789ab)"


def _control_status(voices: FakeVoices) -> Any:
    """Status with a rollback target for joe (1, standby) and none for ann (2 refused, newer),
    signers, and audit entries as the daemon writes them."""
    def status() -> dict[str, Any]:
        def version(v: str, state: str, signer: str | None = SIGNER, reason: str | None = None) -> dict[str, Any]:
            return {"version": v, "state": state, "signer": signer, "reason": reason, "served": 3,
                    "model_failures": 0, "in_flight": 0, "load_seconds": 1.18}
        return {**voices.status(), "uptime": 60.0, "voices": [
            {"name": "joe", "active": "2", "default": True,
             "versions": [version("1", "standby"), version("2", "active")]},
            {"name": "ann", "active": "1", "default": False,
             "versions": [version("1", "active", None), version("2", "refused", None, "its signature is not trusted")]},
        ], "history": [
            {"time": "2026-05-01T10:00:00+0200", "voice": "joe", "from": "1", "to": "2",
             "why": "new version in the models dir", "load_seconds": 1.18},
            {"time": "2026-05-01T10:05:00+0200", "voice": "joe", "from": "2", "to": "2", "why": "restart",
             "load_seconds": 0.43},
            {"time": "2026-05-01T10:06:00+0200", "voice": "ann", "from": None, "to": "2", "why": "refused",
             "reason": "its signature is not trusted"},
            {"time": "2026-05-01T10:06:30+0200", "voice": "joe", "from": "3", "to": None,
             "why": "withdrawn by the fleet mirror: clipped"},
            {"time": "2026-05-01T10:07:00+0200", "voice": "joe", "from": "2", "to": "1", "why": "rollback requested"},
        ]}
    return status


def _text(browser: Any, css: str) -> str:
    """innerText of everything ``css`` matches, read in one script (the page re-renders every poll)."""
    return str(browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText).join('\\n')", css))


def _give_token(browser: Any, wait: Any) -> None:
    from selenium.webdriver.common.by import By

    wait.until(lambda b: b.find_element(By.ID, "auth").is_displayed())
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token-use").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '[data-voice="joe"] tr[data-version="1"] button'))


@pytest.mark.slow
def test_before_the_token_the_page_shows_public_health(tmp_path: Path) -> None:
    """On a TCP listener with a token, before it is given: 1. the page shows what the listener
    tells anyone (up, ready or not, from /healthz and /readyz), control locked, and the prompt;
    2. no card of the status shows, empty or not; nothing is red; 3. readiness follows the daemon;
    4. with the token the status replaces it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    voices = FakeVoices(tmp_path, VOICES, token=TOKEN, activate=False)
    try:
        with _served(voices.backend, tmp_path) as front:
            browser.get(f"http://127.0.0.1:{front.port}/")
            wait = WebDriverWait(browser, 30, poll_frequency=0.1)
            # 1.
            wait.until(lambda b: b.find_element(By.ID, "ready").get_attribute("data-status") == "503")
            assert _text(browser, "#health") == "up"
            assert _text(browser, "#ready") == "not ready no voice is active yet"
            assert "locked" in _text(browser, "#lock") and "need the token" in _text(browser, "#lock")
            assert browser.find_element(By.ID, "prompt").text == "Enter the token to see voices and control them."
            assert _text(browser, "#summary") == "daemon up · not ready"
            # 2.
            shown = browser.execute_script(
                "return Array.from(document.querySelectorAll('main section'),"
                "                  s => s.checkVisibility() ? s.id || 'x' : '').filter(Boolean)")
            assert shown == ["auth"]
            assert browser.find_elements(By.CSS_SELECTOR, "[data-voice]") == []
            assert not browser.find_element(By.ID, "message").is_displayed()
            assert "stale" not in str(browser.find_element(By.ID, "live").get_attribute("class"))
            assert "locked" in _text(browser, "#live")
            colours = browser.execute_script(
                "const probe = document.body.appendChild(document.createElement('i'));"
                "probe.style.color = 'var(--bad)';"
                "const bad = getComputedStyle(probe).color; probe.remove();"
                "return [bad, getComputedStyle(document.getElementById('live'), '::before').color,"
                "        ...Array.from(document.querySelectorAll('#auth *'), e => getComputedStyle(e).color)]")
            assert colours[0] not in colours[1:], colours
            # 3.
            voices.map.activate(("joe", "2"))
            wait.until(lambda b: b.find_element(By.ID, "ready").get_attribute("data-status") == "200")
            assert _text(browser, "#ready") == "ready a voice is active"
            assert _text(browser, "#summary") == "daemon up · ready"
            # 4.
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            browser.find_element(By.ID, "token-use").click()
            wait.until(lambda b: _text(b, '[data-voice="joe"] .active-version') == "2")
            assert not browser.find_element(By.ID, "auth").is_displayed()
            assert "rollback and activate allowed here" in _text(browser, "#box")
            assert TOKEN not in browser.page_source
    finally:
        browser.quit()
        voices.close()


@pytest.mark.slow
def test_rollback_asks_first_and_the_status_reads_plainly(tmp_path: Path) -> None:
    """1. Roll back shows only where there is a version to go back to; 2. it asks first, naming
    the voice, the version serving and the one it goes back to, and does nothing when the answer
    is Cancel or Esc; 3. yes rolls back to exactly the version named; 4. each version shows its
    signer; 5. transitions read as words, not fields; 6. a refused action says why."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ttsd.errors import ConflictError

    browser = _browser()
    voices = FakeVoices(tmp_path, VOICES, token=TOKEN)
    try:
        with _served(replace(voices.backend, status=_control_status(voices)), tmp_path) as front:
            browser.get(f"http://127.0.0.1:{front.port}/")
            wait = WebDriverWait(browser, 30, poll_frequency=0.1)
            _give_token(browser, wait)
            dialog = browser.find_element(By.ID, "confirm")
            # 1.
            assert _text(browser, '[data-voice="joe"] .voice-head button') == "Roll back"
            assert _text(browser, '[data-voice="ann"] .voice-head button') == ""
            # 2.
            for answer in ("cancel", "escape"):
                browser.find_element(By.CSS_SELECTOR, '[data-voice="joe"] .voice-head button').click()
                wait.until(lambda b: dialog.is_displayed())
                assert _text(browser, "#confirm-title") == "Roll back joe?"
                asked = _text(browser, "#confirm-text")
                assert "joe serves version 2 now. Rolling back serves version 1 instead" in asked, asked
                assert _text(browser, "#confirm-yes") == "Roll back to 1"
                if answer == "cancel":
                    browser.find_element(By.ID, "confirm-no").click()
                else:
                    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
                wait.until(lambda b: not dialog.is_displayed())
            browser.execute_script("return new Promise(done => setTimeout(done, 300))")
            assert voices.rollbacks == [] and not browser.find_element(By.ID, "message").is_displayed()
            # 3.
            browser.find_element(By.CSS_SELECTOR, '[data-voice="joe"] .voice-head button').click()
            wait.until(lambda b: dialog.is_displayed())
            browser.find_element(By.ID, "confirm-yes").click()
            wait.until(lambda b: "rollback of joe" in _text(b, "#message"))
            assert _text(browser, "#message") == "rollback of joe: joe now serves 1 (was 2)"
            assert voices.rollbacks == [("joe", "1")]
            # 4.
            assert _text(browser, '[data-voice="joe"] tr[data-version="1"] .signer') == SIGNER
            assert _text(browser, '[data-voice="ann"] tr[data-version="1"] .signer') == "–"
            # 5.
            rows = _text(browser, "#history tbody tr").splitlines()
            history = _text(browser, "#history")
            assert "rolled back from 2 to 1" in rows[0] and "by an operator" in rows[0], rows
            assert "2 refused" in history and "its signature is not trusted" in history
            assert "3 withdrawn" in history and "withdrawn by the fleet mirror: clipped" in history
            assert "stopped serving 3" not in history
            assert "restarted on 2" in history and "loaded in 0.43 s" not in history and "loaded in 0.4 s" in history
            assert "switched from 1 to 2" in history and "loaded in 1.2 s" in history
            assert "2026-05-01 10:07:00" in history
            for raw in ("load_seconds", "→", "=", "T10:", "rollback requested"):
                assert raw not in history, raw
            # 6.
            voices.control_error = ConflictError("joe 1 cannot serve: its copy is damaged")
            browser.find_element(By.CSS_SELECTOR, '[data-voice="joe"] tr[data-version="1"] button').click()
            wait.until(lambda b: "refused" in _text(b, "#message"))
            assert _text(browser, "#message") == ("activation of joe 1 refused: "
                                                  "409 conflict: joe 1 cannot serve: its copy is damaged")
    finally:
        browser.quit()
        voices.close()


@pytest.mark.slow
def test_activate_is_within_reach_on_a_phone(tmp_path: Path) -> None:
    """At 390x844 the version tables stack: 1. every Activate and Roll back button lies inside
    the screen's width, and the page does not scroll sideways; 2. Activate works from there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    voices = FakeVoices(tmp_path, VOICES, token=TOKEN)
    try:
        with _served(replace(voices.backend, status=_control_status(voices)), tmp_path) as front:
            browser.set_window_size(390, 844)
            browser.get(f"http://127.0.0.1:{front.port}/")
            wait = WebDriverWait(browser, 30, poll_frequency=0.1)
            _give_token(browser, wait)
            # 1.
            seen = browser.execute_script(
                "return {width: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,"
                "        scrollX: window.scrollX,"
                "        buttons: Array.from(document.querySelectorAll('#voices button'), b => {"
                "          const r = b.getBoundingClientRect();"
                "          return {text: b.innerText, left: r.left, right: r.right, width: r.width}; })}")
            assert seen["width"] <= 390 and seen["scrollWidth"] <= seen["width"] and seen["scrollX"] == 0, seen
            assert sorted(b["text"] for b in seen["buttons"]) == ["Activate", "Roll back"], seen
            for button in seen["buttons"]:
                assert button["width"] > 0 and button["left"] >= 0 and button["right"] <= seen["width"], seen
            # 2.
            browser.find_element(By.CSS_SELECTOR, '[data-voice="joe"] tr[data-version="1"] button').click()
            wait.until(lambda b: voices.activations == [("joe", "1")])
            assert browser.execute_script("return window.scrollX") == 0
            if os.environ.get("TTSD_PHONE_SCREENSHOT"):
                browser.save_screenshot(os.environ["TTSD_PHONE_SCREENSHOT"])
    finally:
        browser.quit()
        voices.close()
