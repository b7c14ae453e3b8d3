"""An email's unsubscribe link, clicked after the customer's address changed: a real run sends the email (real
SQLite file, real SMTP server), a later customers import gives the customer a new address, and the link from the
email goes to the daemon's site, in this process."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import urllib.parse
from datetime import timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.shop import LINK_KEY, NOW, customer, make_shop, one_time_order, settings_for
from tests.smtp_server import RecordingServer
from tests.test_pipeline_e2e import run_cycle
from worker.adapters import opstore, shop
from worker.adapters.store import Store
from worker.adapters.web import Request, Response
from worker.asyncstore import AsyncStore
from worker.commands.importing import import_file
from worker.config import Settings
from worker.core import tokens
from worker.domain import OrderLineRecord, OrderRecord, OrderStatus
from worker.links import Site
from worker.metrics import Metrics
from worker.pipeline import plan
from worker.testing import FakeClock

OLD = "budi.lama@example.com"
NEW = "siti.baru@mail.example"
OLD2 = "dewi.mati@example.net"
NEW2 = "dewi.hidup@example.org"
ONE_CLICK = b"List-Unsubscribe=One-Click"


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def _sent_then_moved(
    sqlite_url: str, smtp_server: RecordingServer, old: str = OLD, new: str = NEW
) -> tuple[Store, dict[str, str]]:
    """Given a win-back email sent to ``old``, after which the shop's export gives the customer the address ``new``:
    the store, and the email's links (``header``: List-Unsubscribe's https link, ``body``: the visible one)."""
    store = make_shop(sqlite_url, [customer("C1", email=old)], [one_time_order("O1", "C1")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    assert run_cycle(settings, store, FakeClock(NOW)).dispatched.outcomes == {"sent": 1}
    (received,) = smtp_server.messages
    assert received.rcpt_tos == (old,)
    mail = message_from_bytes(received.data)
    header = re.search(r"<(https://[^>]+)>", str(mail["List-Unsubscribe"]))
    text = next(p.get_payload(decode=True).decode() for p in mail.walk() if p.get_content_type() == "text/plain")
    body = re.search(r"https://\S+/unsubscribe\?t=[\w.-]+", text)
    assert header is not None and body is not None
    shop.upsert_customers(store.engine, [customer("C1", email=new)], NOW)  # the later customers import
    return store, {"header": header.group(1), "body": body.group(0)}


def _site(store: Store, settings: Settings | None = None) -> Site:
    """The daemon's site, on a thread of its own for the store's calls (the daemon's ``AsyncStore``); ``settings``
    (default: the shop's as the email was sent)."""
    shop_settings = settings or settings_for(str(store.engine.url))
    return Site(store=AsyncStore(store), keys=[LINK_KEY.encode()], settings=lambda: shop_settings,
                clock=FakeClock(NOW), metrics=Metrics(), paused=lambda: False)  # fmt: skip


def _request(url: str, method: str, body: bytes = b"") -> Request:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    headers = {"content-type": "application/x-www-form-urlencoded"} if body else {}
    return Request(method, "/unsubscribe", query, headers, body)


def _click(store: Store, url: str, method: str, body: bytes = b"", settings: Settings | None = None) -> Response:
    """The link's request as the daemon's site answers it (with ``settings``, see ``_site``)."""
    site = _site(store, settings)
    try:
        return asyncio.run(site.handle(_request(url, method, body)))
    finally:
        site.store.close()


def _old_link(store: Store, shop: str = "toko-kembali.example") -> str:
    """C1's unsubscribe link of the kind emails carried before links named their email: the customer alone; signed
    for ``shop`` (``""``: for none, as links were before they named their shop)."""
    cid = store.customer_by_external_id("C1")
    assert cid is not None
    token = tokens.sign("u", str(cid[0].id), LINK_KEY.encode(), shop=shop)
    return f"https://toko-kembali.example/unsubscribe?t={token}"


def _suppressed(store: Store) -> list[str]:
    return sorted(str(r["email"]) for r in opstore.suppressions(store))


@pytest.mark.parametrize("link", ["header", "body"])
def test_the_unsubscribe_link_suppresses_the_address_the_email_went_to_after_the_customer_moved(
    sqlite_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture, link: str
) -> None:
    store, links = _sent_then_moved(sqlite_url, smtp_server)
    try:
        # When the customer opens the link (a GET: nothing changes), the page names the address the email went to
        page = _click(store, links[link], "GET")
        assert page.status == 200 and "b***@example.com" in page.body.decode() and _suppressed(store) == []
        # And presses the button (the same POST as a mailbox provider's one-click, RFC 8058)
        with caplog.at_level(logging.DEBUG):
            done = _click(store, links[link], "POST", ONE_CLICK)
        # Then the address that got the email is suppressed, and so is the customer's address now (the person
        # asked to stop), and the page and the log say both
        assert done.status == 200
        assert _suppressed(store) == [OLD, NEW]
        assert "b***@example.com" in done.body.decode() and "s***@mail.example" in done.body.decode()
        (event,) = [r.kembali_fields for r in caplog.records if r.getMessage() == "unsubscribed"]
        assert "b***@example.com" in str(event) and "s***@mail.example" in str(event), event
        assert event["new"] is True, event  # a boolean, as the event always gave it (log filters read it so)
        assert OLD not in caplog.text and NEW not in caplog.text
        # And a second click changes nothing and shows the page of one unsubscribed
        assert _click(store, links[link], "POST", ONE_CLICK).status == 200 and _suppressed(store) == [OLD, NEW]
        assert "method=\"post\"" not in _click(store, links[link], "GET").body.decode()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("old", "new"),
    [("budi@example.com", "budi.santoso@example.com"),
     # alike even with their last characters (s***i@): a name ending as the first name does, common in Indonesia
     ("siti@example.com", "siti.rahmawati@example.com")],
)
def test_the_pages_tell_apart_an_address_mailed_and_the_one_now_that_mask_alike(
    sqlite_url: str, smtp_server: RecordingServer, old: str, new: str
) -> None:
    # Given an email sent to budi@example.com, the customer's address now budi.santoso@example.com: masked alike
    store, links = _sent_then_moved(sqlite_url, smtp_server, old, new)
    try:
        # When the customer opens the link, and presses the button
        asked, done = _click(store, links["body"], "GET"), _click(store, links["body"], "POST", ONE_CLICK)
        # Then each page names the two addresses apart: both read "b***@example.com and b***@example.com", one
        # address twice to the customer's eyes, who could not tell which the shop meant
        for page in (asked, done):
            text = page.body.decode()
            named = re.findall(r"[^\s>]+@example\.com", text)
            assert page.status == 200 and len(named) == 2 and len(set(named)) == 2, named
            assert old.partition("@")[0] + "@" not in text and new.split("@")[0][5:] not in text  # still masked
    finally:
        store.close()

def test_an_unsubscribe_link_naming_no_email_suppresses_every_address_mailed_and_the_current(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given the email sent to OLD, and a link that names the customer alone (as emails carried before)
    store, _links = _sent_then_moved(sqlite_url, smtp_server)
    try:
        old_link = _old_link(store)
        # When the customer clicks it in their inbox, and presses the button
        assert _click(store, old_link, "GET").status == 200
        assert _click(store, old_link, "POST", ONE_CLICK).status == 200
        # Then it still works: the address that got the email (the ledger's) and the one on file now are suppressed
        assert _suppressed(store) == [OLD, NEW]
    finally:
        store.close()


def _unbound(url: str) -> str:
    """The link ``url`` as it was signed before links named their shop: the same value, signed for no shop."""
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["t"][0]
    verified = tokens.verify(token, [LINK_KEY.encode()], shop="toko-kembali.example")
    assert verified is not None
    return f"https://toko-kembali.example/unsubscribe?t={tokens.sign(*verified, LINK_KEY.encode(), shop='')}"


def test_a_link_sent_before_links_named_their_shop_works_when_the_shops_ledger_has_its_email(
    sqlite_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the email sent to OLD, its link as it was signed before links named their shop, and a link of before
    # that names the customer alone (every email sent before 2026-12-05 carries one, in its List-Unsubscribe too)
    store, links = _sent_then_moved(sqlite_url, smtp_server)
    try:
        old_link, customer_alone = _unbound(links["header"]), _old_link(store, shop="")
        # When the customer opens the one naming no email and presses its button
        with caplog.at_level(logging.DEBUG):
            clicked = [_click(store, customer_alone, "GET"), _click(store, customer_alone, "POST", ONE_CLICK)]
        # Then it still works, as this shop's ledger mailed the customer: the addresses mailed and the one on file
        assert [r.status for r in clicked] == [200, 200] and _suppressed(store) == [OLD, NEW]
        assert not [r for r in caplog.records if r.getMessage() == "link_rejected"]
        assert customer_alone.split("t=")[1] not in caplog.text
        # And the link from the email (its Message-ID is the ledger's row of the customer, on this shop's domain)
        # works as ever
        assert _click(store, old_link, "POST", ONE_CLICK).status == 200
        assert _suppressed(store) == [OLD, NEW]
    finally:
        store.close()


def test_after_the_shops_domain_changed_its_links_of_before_still_work_once_listed_as_previous_domains(
    sqlite_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the email sent to OLD (its Message-ID and its link's token on toko-kembali.example), after which the
    # operator changed shop.domain
    store, links = _sent_then_moved(sqlite_url, smtp_server)
    moved = settings_for(str(store.engine.url), shop={"domain": "toko-baru.example"})
    listed = settings_for(str(store.engine.url), shop={"domain": "toko-baru.example",
                                                       "previous_domains": ["toko-kembali.example"]})  # fmt: skip

    try:
        # When the link is pressed while the old domain is not listed, Then it is refused (signed for another shop)
        with caplog.at_level(logging.INFO):
            assert _click(store, links["header"], "POST", ONE_CLICK, settings=moved).status == 400
        assert _suppressed(store) == []
        (rejected,) = [r.kembali_fields for r in caplog.records if r.getMessage() == "link_rejected"]
        assert "not signed" in str(rejected["reason"])
        # And once shop.previous_domains lists it, the link and its link of before (signed for no shop, found in
        # the ledger by its Message-ID on the old domain) work: the page names the address the email went to
        assert "b***@example.com" in _click(store, _unbound(links["body"]), "GET", settings=listed).body.decode()
        assert _click(store, links["header"], "POST", ONE_CLICK, settings=listed).status == 200
        assert _suppressed(store) == [OLD, NEW]
    finally:
        store.close()


def _ledger_domain(store: Store, domain: str) -> None:
    """The ledger's Message-IDs on ``domain``, as a version before domains were lower-cased wrote them for a
    ``shop.domain`` written so."""
    with store.engine.begin() as conn:
        for row_id, message_id in conn.execute(sa.text("SELECT id, message_id FROM message")).all():
            local = message_id.rpartition("@")[0]
            conn.execute(sa.text("UPDATE message SET message_id = :m WHERE id = :i"),
                         {"m": f"{local}@{domain}>", "i": row_id})  # fmt: skip


@pytest.mark.parametrize(("sent_for", "listed"), [("Toko-Kembali.Example", "toko-kembali.example"),
                                                  ("toko-kembali.example", "Toko-Kembali.EXAMPLE"),
                                                  ("toko-kembali.example.", "toko-kembali.example."),
                                                  ("Toko-Kembali.Example.", "toko-kembali.example")])  # fmt: skip
def test_a_previous_domain_is_the_old_one_whatever_the_case_either_was_written_in(
    sqlite_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture, sent_for: str, listed: str
) -> None:
    # Given the email sent to OLD while shop.domain was written `sent_for` (its Message-ID on that domain, as the
    # ledger keeps it, a final dot too), and its links of before (signed for no shop: the ledger must show them this
    # shop's), after which the operator changed shop.domain and listed the old one, written `listed`
    store, links = _sent_then_moved(sqlite_url, smtp_server)
    _ledger_domain(store, sent_for)
    url = str(store.engine.url)
    listed_so = settings_for(url, shop={"domain": "toko-baru.example", "previous_domains": [listed]})
    another = settings_for(url, shop={"domain": "toko-baru.example", "previous_domains": ["toko-lain.example"]})

    try:
        # When they are pressed while a truly different domain is listed, Then they are refused, nothing done
        with caplog.at_level(logging.INFO):
            assert _click(store, _unbound(links["header"]), "POST", ONE_CLICK, settings=another).status == 400
        assert _suppressed(store) == []
        (rejected,) = [r.kembali_fields for r in caplog.records if r.getMessage() == "link_rejected"]
        assert "no email to the customer with its Message-ID" in str(rejected["reason"]), rejected
        # And with the old domain listed, in whatever case, they work: domains name the same domain in any case
        assert "b***@example.com" in _click(store, _unbound(links["body"]), "GET", settings=listed_so).body.decode()
        assert _click(store, _unbound(links["header"]), "POST", ONE_CLICK, settings=listed_so).status == 200
        assert _suppressed(store) == [OLD, NEW]
    finally:
        store.close()


def test_an_old_link_whose_current_address_is_suppressed_still_offers_to_stop_the_address_mailed(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given the email sent to OLD, the customer's address now (NEW) already suppressed, and a link of the kind
    # emails carried before (it names the customer alone, not the address its email went to)
    store, _links = _sent_then_moved(sqlite_url, smtp_server)
    try:
        opstore.suppress_many(store, [NEW], reason="unsubscribed", source="test", now=NOW)
        old_link = _old_link(store)
        # When the customer opens it, Then the page still has the button (it said "unsubscribed" from the current
        # address alone, while OLD, which the GET does not look up, went on getting what was planned to it)
        assert 'method="post"' in _click(store, old_link, "GET").body.decode()
        # And pressing it stops OLD too
        assert _click(store, old_link, "POST", ONE_CLICK).status == 200
        assert _suppressed(store) == [OLD, NEW]
    finally:
        store.close()


def test_an_old_links_read_of_every_address_mailed_holds_no_send_back(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    """A link that names no email has the ledger read whole for the customer's addresses (it has no index by
    customer: ~0.2 s a million rows). The daemon's store calls, the senders' group commits among them, go through
    one thread: were the read made there, every send would wait for it, and a link POSTed again and again would
    stop sending."""
    store, _links = _sent_then_moved(sqlite_url, smtp_server)
    old_link = _old_link(store)
    # Given a ledger whose read of the customer's addresses (some millions of rows) lasts until the test ends it
    reading, release, read = threading.Event(), threading.Event(), threading.Event()

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _held_read(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT MESSAGE.EMAIL") and "customer_id" in statement:
            reading.set()
            release.wait(60)
            read.set()

    async def meanwhile() -> tuple[Response, bool]:
        site = _site(store)
        try:
            post = asyncio.ensure_future(site.handle(_request(old_link, "POST", ONE_CLICK)))
            try:
                assert await asyncio.to_thread(reading.wait, 10), "the link never read the ledger's addresses"
                # When a group commit is made while the POST reads the ledger
                await asyncio.wait_for(site.store.call(store.record_and_mark, [], [], worker="w", now=NOW), 20)
                committed_during_the_read = not read.is_set()
            finally:
                release.set()
            return await post, committed_during_the_read
        finally:
            site.store.close()

    try:
        done, committed_during_the_read = asyncio.run(meanwhile())
        # Then the commit does not wait for the read, and the link does what it did
        assert committed_during_the_read
        assert done.status == 200 and _suppressed(store) == [OLD, NEW]
    finally:
        release.set()
        store.close()


def test_an_unsubscribe_click_stops_the_email_already_planned_to_the_customer(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given two customers sent a win-back email (a real run, a real SMTP server), who then order again and are
    # planned a rating request each, not sent yet
    store = make_shop(db_url, [customer("C1"), customer("C2")],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])  # fmt: skip
    settings = settings_for(db_url, smtp={"port": smtp_server.port}, campaigns={"feedback": {"enabled": True}})
    try:
        assert run_cycle(settings, store, FakeClock(NOW)).dispatched.outcomes == {"sent": 2}
        c1_mail = next(m for m in smtp_server.messages if m.rcpt_tos == ("c1@example.com",))
        header = re.search(r"<(https://[^>]+)>", str(message_from_bytes(c1_mail.data)["List-Unsubscribe"]))
        assert header is not None
        later = NOW + timedelta(days=10)
        shop.upsert_orders(store.engine, [
            OrderRecord(f"O{n}-again", f"C{n}", OrderStatus.DELIVERED, NOW + timedelta(days=1),
                        NOW + timedelta(days=2), 89_000_00, "IDR", (OrderLineRecord("P-KOPI", 1, 89_000_00),))
            for n in (1, 2)
        ], later)  # fmt: skip
        plan(store, settings, later)
        planned = store.messages(limit=100)
        assert sorted((r["email"], r["status"]) for r in planned if r["campaign"] == "feedback") == [
            ("c1@example.com", "planned"), ("c2@example.com", "planned")]

        # When customer 1 presses the button behind the win-back email's unsubscribe link (a mailbox provider's
        # one-click POST is the same request)
        assert _click(store, header.group(1), "POST", ONE_CLICK).status == 200

        # Then the next run sends customer 2's rating request only: customer 1's ends skipped, as suppressed
        smtp_server.messages.clear()
        report = run_cycle(settings, store, FakeClock(later))
        assert [m.rcpt_tos for m in smtp_server.messages] == [("c2@example.com",)]
        assert report.dispatched.outcomes == {"sent": 1, "skipped:suppressed": 1}
        rows = {r["email"]: (r["status"], r["skip_reason"]) for r in store.messages(limit=100)
                if r["campaign"] == "feedback"}  # fmt: skip
        assert rows == {"c1@example.com": ("skipped", "suppressed"), "c2@example.com": ("sent", None)}
    finally:
        store.close()


def test_a_link_acts_only_for_its_purpose_and_its_shops_key(sqlite_url: str, smtp_server: RecordingServer) -> None:
    """Review evidence (links.py): a token names its purpose (``u`` unsubscribe, ``f`` rating) inside what is
    signed, and the site checks it; a token signed with another shop's key verifies nowhere."""
    store, links = _sent_then_moved(sqlite_url, smtp_server)
    unsubscribe_token = urllib.parse.parse_qs(urllib.parse.urlsplit(links["header"]).query)["t"][0]
    cid = store.customer_by_external_id("C1")
    assert cid is not None
    shop = "toko-kembali.example"
    rating_token = tokens.sign("f", f"{cid[0].id}:5", LINK_KEY.encode(), shop=shop)  # a rating token, the same digits
    other_shop = tokens.sign("u", str(cid[0].id), b"another-shops-key-of-length", shop=shop)
    site = _site(store)
    try:
        def post(path: str, token: str, body: bytes) -> int:
            request = Request("POST", path, {"t": [token]}, {"content-type": "application/x-www-form-urlencoded"}, body)
            return asyncio.run(site.handle(request)).status

        # When the unsubscribe token is posted as a rating, a rating token and another shop's token as unsubscribes
        assert post("/feedback", unsubscribe_token, b"comment=x") == 400
        # (an unsubscribe token whose value would read as a rating: order 1, score 5)
        assert post("/feedback", tokens.sign("u", "1:5", LINK_KEY.encode(), shop=shop), b"comment=x") == 400
        assert post("/unsubscribe", rating_token, ONE_CLICK) == 400
        assert post("/unsubscribe", other_shop, ONE_CLICK) == 400
        # Then nothing was rated or suppressed; and the real link still works, once, for its own customer only
        assert opstore.feedback(store) == [] and _suppressed(store) == []
        assert post("/unsubscribe", unsubscribe_token, ONE_CLICK) == 200
        assert _suppressed(store) == sorted([OLD, NEW])
    finally:
        site.store.close()


def test_a_link_sent_while_shop_domain_had_a_final_dot_names_the_address_mailed_on_its_page(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given the email sent to OLD while shop.domain was written "toko-kembali.example." (its Message-ID so in the
    # ledger, as versions before domains were taken without a final dot wrote it), the customer now at NEW
    store, links = _sent_then_moved(sqlite_url, smtp_server)
    _ledger_domain(store, "toko-kembali.example.")
    try:
        # When its link is opened (a GET, which reads no ledger whole)
        page = _click(store, links["body"], "GET").body.decode()
    finally:
        store.close()
    # Then the page names the address the email went to, as it did before, beside the one on file
    assert "b***@example.com" in page and "s***@mail.example" in page


def _import_customers(settings: Settings, folder: Path, rows: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``kembali import customers`` of a customers.csv with ``rows`` (after its header): what it printed."""
    path = folder / "customers.csv"
    header = "id,email,name,locale,time_zone,birthday,marketing_consent,consent_basis,consent_source"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert import_file(settings, "customers", path, now=NOW) == 0
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_an_unsubscribe_follows_the_customer_to_the_address_a_later_import_gives_them(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given C1 sent a win-back reminder at OLD (a real run, a real SMTP server) and planned the next step, not sent
    # yet; and C2, whose address OLD2 bounced (a dead mailbox: the address, not the person)
    store = make_shop(db_url, [customer("C1", email=OLD), customer("C2", email=OLD2)],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])  # fmt: skip
    steps = [{"days": 45, "template": "winback-reminder"}, {"days": 75, "template": "winback"},
             {"days": 120, "template": "winback-last"}]
    settings = settings_for(db_url, smtp={"port": smtp_server.port}, campaigns={"winback": {"steps": steps}})
    try:
        assert run_cycle(settings, store, FakeClock(NOW)).dispatched.outcomes == {"sent": 2}
        c1_mail = next(m for m in smtp_server.messages if m.rcpt_tos == (OLD,))
        header = re.search(r"<(https://[^>]+)>", str(message_from_bytes(c1_mail.data)["List-Unsubscribe"]))
        assert header is not None
        store.suppress(OLD2, reason="hard_bounce", source="smtp:winback:C2:O2:1", now=NOW)
        later = NOW + timedelta(days=16)  # the order 76 days old: step 2 is due
        assert plan(store, settings, later).created == {"winback": 1}  # C1's (C2's address is suppressed)
        # And C1 presses the unsubscribe button: OLD is suppressed, the address C1 has now
        assert _click(store, header.group(1), "POST", ONE_CLICK).status == 200
        assert _suppressed(store) == sorted([OLD, OLD2])

        # When a later customers import gives C1 and C2 new addresses (changed in the shop)
        with caplog.at_level(logging.INFO):
            said = _import_customers(settings, tmp_path, [
                f"C1,{NEW},Budi C1,id,Asia/Jakarta,,true,opt_in,checkout",
                f"C2,{NEW2},Budi C2,id,Asia/Jakarta,,true,opt_in,checkout",
            ], capsys)

        # Then the unsubscribe follows C1 (the person asked to stop) and the import says so, addresses masked
        entries = {r["email"]: (r["reason"], r["source"]) for r in opstore.suppressions(store)}
        assert entries[NEW][0] == "unsubscribed" and "C1" in entries[NEW][1], entries
        assert "C1" in said and "s***@mail.example" in said and "b***@example.com" in said, said
        assert OLD not in said and NEW not in said, said
        assert "1 new address suppressed" in said, said
        # but the bounce stays with the dead mailbox: C2's new address is not suppressed
        assert NEW2 not in entries and "C2" not in said, said
        # And the step planned before goes to neither address: skipped as suppressed, as an unsubscribe is
        smtp_server.messages.clear()
        report = run_cycle(settings, store, FakeClock(later))
        assert [m.rcpt_tos for m in smtp_server.messages] == [(NEW2,)]  # C2's step 2, planned by this run
        row = next(r for r in store.messages(limit=100) if r["dedupe_key"] == "winback:C1:O1:2")
        assert (row["status"], row["skip_reason"]) == ("skipped", "suppressed")
        assert report.dispatched.outcomes == {"sent": 1, "skipped:suppressed": 1}
        # And planning plans C1 nothing more (the last step, when its day comes)
        assert plan(store, settings, NOW + timedelta(days=61)).created == {"winback": 1}  # C2's
        assert {r["email"] for r in store.messages(limit=100) if r["dedupe_key"].endswith(":3")} == {NEW2}
    finally:
        store.close()


def test_an_import_that_carries_many_unsubscribes_names_the_first_and_counts_them_all(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer who complained and 25 who unsubscribed, all of whom a later import gives new addresses
    people = [customer(f"C{n}") for n in range(26)]
    store = make_shop(sqlite_url, people, [])
    settings = settings_for(sqlite_url)
    try:
        store.suppress(people[0].email, reason="complaint", source="test", now=NOW)
        opstore.suppress_many(store, [p.email for p in people[1:]], reason="unsubscribed", source="test", now=NOW)
        rows = [f"C{n},c{n}.baru@example.org,Budi C{n},id,Asia/Jakarta,,true,opt_in,checkout" for n in range(26)]
        # When the import runs
        said = _import_customers(settings, tmp_path, rows, capsys)
    finally:
        store.close()
    # Then the first 20 are named (by line), the rest counted, and the summary counts all 26
    notes = [line for line in said.splitlines() if line.startswith("note: customers.csv:") and "customer 'C" in line]
    assert len(notes) == 20 and notes[:2] == [
        "note: customers.csv:2: customer 'C0': their new address c***@example.org is suppressed too, as they reported "
        "an email to c***@example.com as spam",
        "note: customers.csv:3: customer 'C1': their new address c***@example.org is suppressed too, as they "
        "unsubscribed as c***@example.com"], notes[:2]
    assert "note: customers.csv: 26 customers in all have a new address suppressed" in said, said
    assert "26 updated, 0 unchanged, 0 rejected, 26 new addresses suppressed" in said, said
    assert "@example.org" not in said.replace("c***@example.org", ""), said


def _budi_moves(url: str, reason: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, str]]:
    """Budi, on the suppression list as budi@example.com for ``reason``, then given budi.santoso@example.com by a
    customers import: what the import said, and the list's entries (address → reason)."""
    store = make_shop(url, [customer("C1", email="budi@example.com")], [])
    try:
        store.suppress("budi@example.com", reason=reason, source="test", now=NOW)
        said = _import_customers(settings_for(url), folder, ["C1,budi.santoso@example.com,Budi Santoso,id,"
                                                             "Asia/Jakarta,,true,opt_in,checkout"], capsys)  # fmt: skip
        return said, {e["email"]: e["reason"] for e in opstore.suppressions(store)}
    finally:
        store.close()


def test_an_import_note_tells_the_old_and_the_new_address_apart_when_they_mask_alike(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given Budi, who unsubscribed as budi@example.com, and a later import giving him budi.santoso@example.com
    said, _ = _budi_moves(sqlite_url, "unsubscribed", tmp_path, capsys)
    # Then the note names two addresses the operator can tell apart (it read "their new address b***@example.com
    # is suppressed too, as they unsubscribed as b***@example.com": one address, to the eye)
    assert ("note: customers.csv:2: customer 'C1': their new address b***o@example.com is suppressed too, as they "
            "unsubscribed as b***i@example.com") in said, said


@pytest.mark.parametrize(("listed_as", "kept"), [("hard_bounce", "unsubscribed"), ("manual", "unsubscribed"),
                                                 ("complaint", "complaint")])
def test_an_unsubscribe_of_an_address_listed_for_another_reason_is_kept_as_the_customers_own_wish(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    listed_as: str, kept: str,
) -> None:
    # Given C1 sent a win-back email at OLD, and OLD on the list since then for another reason (a relay's bounce
    # imported with --reason hard_bounce, a mailbox full for a week; an operator's manual entry)
    store = make_shop(db_url, [customer("C1", email=OLD)], [one_time_order("O1", "C1")])
    settings = settings_for(db_url, smtp={"port": smtp_server.port})
    try:
        assert run_cycle(settings, store, FakeClock(NOW)).dispatched.outcomes == {"sent": 1}
        mail = message_from_bytes(smtp_server.messages[0].data)
        header = re.search(r"<(https://[^>]+)>", str(mail["List-Unsubscribe"]))
        assert header is not None
        store.suppress(OLD, reason=listed_as, source="import:bounces.csv", now=NOW - timedelta(days=1))
        # When the customer opens the email's unsubscribe link, Then the page offers the button, unless the list
        # has their own wish already: it said "you're unsubscribed" of a bounce, and nothing was recorded
        page = _click(store, header.group(1), "GET").body.decode()
        assert ('method="post"' in page) is (kept != listed_as), page
        # And pressing it (or a mailbox provider's one-click POST) records the unsubscribe as theirs
        assert _click(store, header.group(1), "POST", ONE_CLICK).status == 200
        (entry,) = opstore.suppressions(store)
        assert (entry["email"], entry["reason"]) == (OLD, kept), entry
        assert entry["source"] == ("unsubscribe-link" if kept != listed_as else "import:bounces.csv"), entry
        # So it follows the customer to the address a later import gives them (README: "any address a later
        # import gives the customer"), as an unsubscribe does, where the bounce stayed with OLD and NEW got mail
        _import_customers(settings, tmp_path, [f"C1,{NEW},Budi C1,id,Asia/Jakarta,,true,opt_in,checkout"], capsys)
        assert _suppressed(store) == [OLD, NEW]
    finally:
        store.close()


def test_a_complaint_an_earlier_version_stored_as_typed_follows_the_customer_to_a_new_address(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given Budi, whose complaint an earlier kembali stored as typed ('Complaint': `suppress add --reason Complaint`)
    # When a later import gives him another address
    said, entries = _budi_moves(db_url, "Complaint", tmp_path, capsys)
    # Then his wish follows him there, as a complaint stored as Kembali writes it does: he gets no email at the new
    # address, where the entry in another case was not read as his own wish and he was mailed again
    assert entries.get("budi.santoso@example.com") == "complaint", entries
    assert ("customer 'C1': their new address b***o@example.com is suppressed too, as they reported an email to "
            "b***i@example.com as spam") in said, said
