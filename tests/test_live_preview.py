"""`kembali preview --serve` in a real headless Chromium: content, live reload, and errors with file:line; and the
shipped emails' layout on a phone's screen.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package;
skips without them unless KEMBALI_REQUIRE_BROWSER=1 (set in CI), which makes
their absence a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.shop_fixtures import REPO, Site, make_site
from worker.adapters.templates import JinjaTemplates
from worker.checks import campaigns_to_check

REQUIRE = os.environ.get("KEMBALI_REQUIRE_BROWSER") == "1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _need(condition: object, why: str) -> None:
    if not condition:
        if REQUIRE:
            pytest.fail(f"{why} (KEMBALI_REQUIRE_BROWSER=1 makes the browser test required)")
        pytest.skip(why)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    _need(CHROMIUM and DRIVER, "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need(False, "selenium is not installed (pip install -e '.[dev]')")
        raise
    options = webdriver.ChromeOptions()
    # No network: product images point at the reserved .example domain; fail their lookups at once.
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def _serving(site: Site) -> Iterator[str]:
    """``preview --serve --port 0`` for ``site``: its page's URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(site.config), "preview", "--serve", "--port", "0"],
        cwd=REPO, env=site.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "live preview on http://127.0.0.1:" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Site, str]]:
    site = make_site(tmp_path / "site", copy_templates=True)
    with _serving(site) as url:
        yield site, url


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _across_reloads(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check`` for WebDriverWait, not yet true while the node it read went away with a reload: Chromium 156
    reports that as an "unknown error" (node "does not belong to the document"), not as a stale element."""
    from selenium.common.exceptions import WebDriverException

    def attempt(driver: Any) -> Any:
        try:
            return check(driver)
        except WebDriverException as exc:
            if "does not belong to the document" in (exc.msg or ""):
                return False
            raise

    return attempt


def test_live_preview_shows_reloads_and_reports_errors(browser: object, served: tuple[Site, str]) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    site, url = served
    # the page reloads itself while we look: an element found just before a reload goes stale, so retry
    # (``_across_reloads`` for the same thing said otherwise)
    wait = WebDriverWait(driver, 30, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))

    # Given the page, every campaign x language x sample customer is a card
    driver.get(url)
    cards = driver.find_elements(By.CSS_SELECTOR, "section.card")
    # winback, birthday, …; not the shipped winback-last/ and winback-reminder/, no step of this one-step config's
    folders = campaigns_to_check(site.settings, JinjaTemplates(site.folder / "templates"))
    assert len(folders) >= 5 and len(cards) == 2 * 10 * len(folders)
    siti_en = driver.find_element(By.ID, "winback-en-siti")
    assert siti_en.find_element(By.CLASS_NAME, "subject-text").text.startswith("Siti, still loving your")
    assert "Unsubscribe: https://" in siti_en.find_element(By.CLASS_NAME, "text-part").text
    # the HTML part renders in its frame, with hostile data escaped
    driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "#winback-en-html iframe"))
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "<script>alert(1)</script>" in body and "Shop now" in body
    assert driver.find_elements(By.TAG_NAME, "script") == []
    driver.switch_to.default_content()

    # When the operator edits the English subject, the page reloads by itself and shows it
    templates = site.folder / "templates" / "winback" / "en"
    _edit(templates / "subject.txt", " loving your ", " loving, truly, your ")
    wait.until(_across_reloads(lambda d: d.find_element(By.CSS_SELECTOR, "#winback-en-siti .subject-text").text
                               .startswith("Siti, still loving, truly, your")))  # fmt: skip

    # When they break the HTML body, each card shows the error with file and line instead of crashing
    _edit(templates / "body.html", "{% if recommendations %}", "{% if recommendations %}{{ recomendations[0] }}")
    line = next(i for i, text in enumerate((templates / "body.html").read_text().splitlines(), start=1)
                if "recomendations[0]" in text)  # fmt: skip
    error = wait.until(
        _across_reloads(lambda d: d.find_element(By.CSS_SELECTOR, "#winback-en-siti .template-error").text)
    )
    assert f"winback/en/body.html:{line}: " in error and "recomendations" in error
    # and the Indonesian cards still render
    assert driver.find_elements(By.CSS_SELECTOR, "#winback-id-siti .subject-text")

    # When they fix it, the page recovers
    _edit(templates / "body.html", "{{ recomendations[0] }}", "")
    wait.until(_across_reloads(lambda d: d.find_elements(By.CSS_SELECTOR, "#winback-en-siti .subject-text")))


def test_a_connection_that_sends_nothing_does_not_stop_the_page(served: tuple[Site, str]) -> None:
    """Browsers open connections ahead of need and may leave them idle: the page and its polls still answer."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    _site, url = served
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "", parts.port or 0)):  # connected, never sends a byte
        with urllib.request.urlopen(url + "version", timeout=5) as reply:  # noqa: S310 - a loopback test URL
            assert reply.status == 200 and "version" in reply.read().decode()
        with urllib.request.urlopen(url, timeout=30) as reply:  # noqa: S310 - a loopback test URL
            assert "section class=\"card\"" in reply.read().decode()
        for path in ("../config.toml", "%2e%2e/config.toml", "/etc/passwd", "templates/winback/id/body.txt"):
            try:
                urllib.request.urlopen(url + path, timeout=5)  # noqa: S310 - a loopback test URL
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
            else:
                raise AssertionError(f"{path} was served")


def test_a_head_is_answered_as_a_get_without_the_body_and_other_methods_get_405(served: tuple[Site, str]) -> None:
    """A HEAD (a link checker's, curl -I) got 501 "Unsupported method", and a POST the same, where HTTP says 405 and
    which methods the page takes."""
    import http.client
    from urllib.parse import urlsplit

    _site, url = served
    parts = urlsplit(url)

    def ask(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 0, timeout=60)
        try:
            conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
            reply = conn.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            conn.close()

    for path in ("/", "/version", "/nothing"):
        got, got_headers, body = ask("GET", path)
        status, headers, nothing = ask("HEAD", path)
        assert (status, nothing) == (got, b""), (path, status, nothing)
        assert headers["Content-Type"] == got_headers["Content-Type"], path
        assert path == "/" or headers["Content-Length"] == str(len(body)), path  # (the page's /version may change)
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _body = ask(method, "/")
        assert status == 405 and headers["Allow"] == "GET, HEAD", (method, status, headers)


def test_a_filter_that_does_not_exist_is_shown_at_its_file_and_line(served: tuple[Site, str]) -> None:
    import html
    import urllib.request

    site, url = served
    # When the operator saves the text layout with a filter Kembali does not have
    layout = site.folder / "templates" / "_layout.txt"
    _edit(layout, "{{ shop.postal_address }}", "{{ shop.postal_address | idr }}")
    line = next(i for i, row in enumerate(layout.read_text().splitlines(), start=1) if "| idr" in row)
    with urllib.request.urlopen(url, timeout=60) as reply:  # noqa: S310 - a loopback test URL
        page = html.unescape(reply.read().decode())
    # Then the page names it at its file and line, above the cards and in each: it showed only
    # "TemplateAssertionError: No filter named 'idr'." in place of the checks
    assert f'class="error lint-error">_layout.txt:{line}: syntax error: No filter named \'idr\'.' in page
    assert f'class="error template-error">_layout.txt:{line}: syntax error: No filter named \'idr\'.' in page
    assert "TemplateAssertionError" not in page


def test_an_edit_in_a_campaign_folder_that_is_a_link_to_another_reloads_the_page(tmp_path: Path) -> None:
    """A shop whose win-back templates live elsewhere (shared by two shops, kept in another checkout), linked in: an
    edit there changed what the page renders, but not the version it polls, so the page never reloaded."""
    import json
    import urllib.request

    site = make_site(tmp_path / "site", copy_templates=True)
    shared = tmp_path / "shared-winback"
    (site.folder / "templates" / "winback").rename(shared)
    (site.folder / "templates" / "winback").symlink_to(shared, target_is_directory=True)
    (site.folder / "templates" / "loop").symlink_to(site.folder / "templates", target_is_directory=True)  # a cycle
    with _serving(site) as url:

        def version() -> str:
            with urllib.request.urlopen(url + "version", timeout=30) as reply:  # noqa: S310 - a loopback test URL
                return str(json.load(reply)["version"])

        before = version()
        # When the operator edits the win-back subject in the linked folder
        subject = shared / "en" / "subject.txt"
        subject.write_text(subject.read_text(encoding="utf-8") + " (edited)", encoding="utf-8")
        # Then the version the page polls changes, so it reloads (as for an edit in a folder of its own)
        assert version() != before


def test_a_request_naming_another_host_is_refused_so_a_rebinding_web_page_cannot_read_the_preview(
    served: tuple[Site, str],
) -> None:
    """DNS rebinding: a web page the operator opens (``http://attacker.example:8025/``) re-resolves its name to
    127.0.0.1 and reads the preview as its own origin; only its Host header tells it apart."""
    import http.client
    from urllib.parse import urlsplit

    _site, url = served
    port = urlsplit(url).port or 0

    def get(path: str, host: str | None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.putrequest("GET", path, skip_host=True)
            if host is not None:
                conn.putheader("Host", host)
            conn.endheaders()
            reply = conn.getresponse()
            return reply.status, reply.read().decode()
        finally:
            conn.close()

    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}",
                 f"localhost.:{port}x"):
        for path in ("/", "/version"):
            status, body = get(path, host)
            assert status == 403 and "card" not in body and "version" not in body, (host, path, status)
            assert "http://127.0.0.1:" in body  # says which address to use instead
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LOCALHOST:{port}", None):
        status, body = get("/version", host)
        assert status == 200 and "version" in body, (host, status)
    status, body = get("/", f"localhost:{port}")
    assert status == 200 and 'section class="card"' in body


def test_a_page_load_cut_short_by_the_browser_leaves_no_traceback_on_the_terminal(tmp_path: Path) -> None:
    """The operator reloads (or the page reloads itself) while ``/`` is still rendering: the browser resets the
    old connection, and each time http.server printed a 20-line ConnectionResetError traceback."""
    import socket
    import struct
    import time
    import urllib.request

    site = make_site(tmp_path / "site", copy_templates=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(site.config), "preview", "--serve", "--port", "0"],
        cwd=REPO, env=site.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" on ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        for _ in range(2):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            time.sleep(0.05)  # the page is rendering
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
            client.close()
        with urllib.request.urlopen(url, timeout=60) as reply:  # noqa: S310 - a loopback test URL
            assert 'section class="card"' in reply.read().decode()  # (after the cut-off renders finished)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
    assert "Traceback" not in err and "Exception occurred" not in err, err


def _free_port_pair() -> tuple[int, int]:
    """A port the kernel calls free, whose next port is free too."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as after:
            try:
                after.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port, port + 1
    raise AssertionError("no two free ports in a row")


def test_serve_without_a_port_does_not_take_the_daemons_web_port(tmp_path: Path) -> None:
    """Both used to default to 8025: a preview left open kept ``kembali run`` from starting (its web server
    could not listen), and a running daemon kept ``preview --serve`` from starting."""
    import socket
    import urllib.request

    # Given the daemon listening on its web.port
    daemon_port, next_port = _free_port_pair()
    site = make_site(tmp_path / "site", copy_templates=True, extra_toml=f"[web]\nport = {daemon_port}\n")
    with socket.socket() as daemon:
        daemon.bind(("127.0.0.1", daemon_port))
        daemon.listen()

        # When the operator starts the live preview without --port
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", str(site.config), "preview", "--serve"],
            cwd=REPO, env=site.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()

            # Then it serves on the port after the daemon's
            assert f"live preview on http://127.0.0.1:{next_port}/" in line, line
            with urllib.request.urlopen(f"http://127.0.0.1:{next_port}/version", timeout=30) as reply:
                assert reply.status == 200
        finally:
            proc.terminate()
            proc.communicate(timeout=10)


def test_serve_with_templates_dir_not_a_folder_says_so_and_stops(tmp_path: Path) -> None:
    """It served a page of 'winback/en/subject.txt: template not found' cards, one per campaign, language and
    sample, where `preview` and `check` say that templates.dir is not a folder."""
    site = make_site(tmp_path / "site", copy_templates=True)
    site.config.write_text(site.config.read_text().replace(str(site.folder / "templates"), str(tmp_path / "nope")))
    done = site.cli("preview", "--serve", "--port", "0", timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"'templates.dir' '{tmp_path / 'nope'}' is not a folder" in done.stderr
    assert "live preview on" not in done.stdout


@pytest.mark.parametrize("locale", ["id", "en"])
def test_a_300_character_word_in_a_name_or_product_title_stays_inside_a_phones_screen(
    browser: object, tmp_path: Path, locale: str
) -> None:
    """A title of one 300-character word (a SKU, a marketplace title without spaces) or such a name widened the
    cell that shows it to fit: the 600px email was 3,100px wide, its text off the side of a phone's screen."""
    from selenium.webdriver.remote.webdriver import WebDriver

    from tests.test_copy import FOLDERS, LONG_WORD, _product, render
    from worker.domain import Locale

    driver: WebDriver = browser  # type: ignore[assignment]
    driver.set_window_size(420, 900)
    catalogue = [_product("P-1", LONG_WORD, "Batik"), _product("P-2", "Kopi Gayo Arabika 250 g")]
    for folder in FOLDERS:
        email = render(folder, Locale(locale), name="Siti" + "Y" * 296, catalogue=catalogue, bought=catalogue[:1])
        page = tmp_path / f"{folder}.html"
        page.write_text(email.rendered.html, encoding="utf-8")
        driver.get(page.as_uri())
        scroll, inner = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner, (folder, scroll, inner)
