"""Two shops whose operators use the same link key: a link from one shop's email does nothing at the other's site.
Each shop is a real SQLite file; its emails go through a real SMTP server; the links from the emails are clicked
at the daemon's site, in this process. Links sent before tokens named their shop still work where the shop's
ledger shows them its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.shop import LINK_KEY, NOW, customer, make_shop, one_time_order, settings_for
from tests.smtp_server import RecordingServer, closed_port
from tests.test_pipeline_e2e import run_cycle
from worker.adapters import opstore
from worker.adapters.store import Store
from worker.adapters.web import HttpServer, Request
from worker.asyncstore import AsyncStore
from worker.config import Settings
from worker.core import tokens
from worker.domain import OrderStatus
from worker.links import Site
from worker.metrics import Metrics
from worker.testing import FakeClock

ONE_CLICK = b"List-Unsubscribe=One-Click"
FEEDBACK = {"feedback": {"enabled": True, "days_after": 7, "lookback_days": 14}}


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


class Shop(NamedTuple):
    store: Store
    settings: Settings


def _settings(store: Store, domain: str, port: int | None = None, **shop: object) -> Settings:
    return settings_for(str(store.engine.url), smtp={"port": closed_port() if port is None else port},
                        shop={"domain": domain, **shop}, campaigns=FEEDBACK)  # fmt: skip


def _shop(tmp_path: Path, name: str, email: str) -> Store:
    """A shop whose one customer C1 (database id 1) has one delivered order O1 (database id 1), 8 days old: due a
    feedback request."""
    return make_shop(f"sqlite:///{tmp_path / name}.db", [customer("C1", email=email)],
                     [one_time_order("O1", "C1", days_ago=8)])  # fmt: skip


def _links(server: RecordingServer) -> tuple[str, dict[int, str]]:
    """The last email's unsubscribe token (List-Unsubscribe's https link) and its rating tokens by score."""
    mail = message_from_bytes(server.messages[-1].data)
    header = re.search(r"<https://[^>]+\?t=([\w.-]+)>", str(mail["List-Unsubscribe"]))
    assert header is not None
    text = next(p.get_payload(decode=True).decode() for p in mail.walk() if p.get_content_type() == "text/plain")
    ratings = {}
    for token in re.findall(r"https://\S+/feedback\?t=([\w.-]+)", text):
        verified = tokens.verify(token, [LINK_KEY.encode()], shop="toko-a.example")  # f:<order id>:<score>
        assert verified is not None
        ratings[int(verified[1].rpartition(":")[2])] = token
    return header.group(1), ratings


def _post(settings: Settings, store: Store, route: str, token: str, body: bytes) -> tuple[int, str]:
    site = Site(store=AsyncStore(store), keys=[LINK_KEY.encode()], settings=lambda: settings, clock=FakeClock(NOW),
                metrics=Metrics(), paused=lambda: False)  # fmt: skip
    try:
        headers = {"content-type": "application/x-www-form-urlencoded"}
        response = asyncio.run(site.handle(Request("POST", route, {"t": [token]}, headers, body)))
        return response.status, response.body.decode()
    finally:
        site.store.close()


async def _fetch(site: Site, raw: bytes) -> bytes:
    server = HttpServer(site.handle, host="127.0.0.1", port=0)
    port = await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return reply
    finally:
        await server.close()


def _get(settings: Settings, store: Store, route: str, token: str) -> bytes:
    """The page a GET of ``route?t=token`` gets from the daemon's HTTP server on 127.0.0.1 (what a mail scanner's
    prefetch, or a customer's click, sees)."""
    site = Site(store=AsyncStore(store), keys=[LINK_KEY.encode()], settings=lambda: settings, clock=FakeClock(NOW),
                metrics=Metrics(), paused=lambda: False)  # fmt: skip
    try:
        return asyncio.run(_fetch(site, f"GET {route}?t={token} HTTP/1.1\r\nHost: shop\r\n\r\n".encode()))
    finally:
        site.store.close()


def _rejections(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.kembali_fields for r in caplog.records if r.getMessage() == "link_rejected"]  # type: ignore[attr-defined]


@contextlib.contextmanager
def _two_shops(tmp_path: Path, server: RecordingServer) -> Iterator[tuple[Shop, Shop, str, dict[int, str]]]:
    """Shop A, which sent its customer 1 a feedback request through ``server``, and shop B, whose customer 1 is
    someone else and whose order 1 is another order: (A, B, the email's unsubscribe token, its rating tokens)."""
    a, b = _shop(tmp_path, "a", "ani@example.com"), _shop(tmp_path, "b", "bayu@example.net")
    try:
        shop_a = _settings(a, "toko-a.example", server.port)
        assert run_cycle(shop_a, a, FakeClock(NOW)).dispatched.outcomes == {"sent": 1}
        unsubscribe, ratings = _links(server)
        yield Shop(a, shop_a), Shop(b, _settings(b, "toko-b.example")), unsubscribe, ratings
    finally:
        a.close()
        b.close()


def test_one_shops_links_do_nothing_at_another_shop_with_the_same_key(
    tmp_path: Path, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given shop A, which sent its customer 1 a feedback request, and shop B, whose customer 1 is someone else and
    # whose order 1 is another order: both operators export the same KEMBALI_LINK_SECRET
    with _two_shops(tmp_path, smtp_server) as ((a, shop_a), (b, shop_b), unsubscribe, ratings):
        # When A's links are pressed at B's site (the same key verifies them there)
        with caplog.at_level(logging.DEBUG):
            refused = _post(shop_b, b, "/unsubscribe", unsubscribe, ONE_CLICK)
            rated = _post(shop_b, b, "/feedback", ratings[1], b"comment=awful")
        # Then B's site shows the bad-link page for both, and B's customer 1 and order 1 are left alone
        assert refused[0] == 400 and rated[0] == 400
        assert opstore.suppressions(b) == [] and opstore.feedback(b) == []
        assert [e["route"] for e in _rejections(caplog)] == ["unsubscribe", "feedback"]
        assert LINK_KEY not in caplog.text and unsubscribe not in caplog.text and ratings[1] not in caplog.text
        # And at A's own site they work
        assert _post(shop_a, a, "/unsubscribe", unsubscribe, ONE_CLICK)[0] == 200
        assert [s["email"] for s in opstore.suppressions(a)] == ["ani@example.com"]
        assert _post(shop_a, a, "/feedback", ratings[4], b"comment=ok")[0] == 200
        assert [(f.order_ref, f.score) for f in opstore.feedback(a)] == [("1", 4)]


def _unbound(token: str) -> str:
    """``token`` as it was signed before tokens named their shop: the same value, signed for no shop."""
    verified = tokens.verify(token, [LINK_KEY.encode()], shop="toko-a.example")
    assert verified is not None
    return tokens.sign(*verified, LINK_KEY.encode(), shop="")


def test_links_sent_before_tokens_named_their_shop_work_where_the_ledger_shows_them_its_own_and_nowhere_else(
    tmp_path: Path, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given shop A's feedback request, its links as they were signed before tokens named their shop, and shop B with
    # the same key, whose customer 1 and order 1 are others (B's ledger has no email of A's, nor a feedback request)
    with _two_shops(tmp_path, smtp_server) as ((a, shop_a), (b, shop_b), bound, ratings):
        unsubscribe, rating = _unbound(bound), _unbound(ratings[2])
        customer_alone = tokens.sign("u", "1", LINK_KEY.encode(), shop="")  # a link of before naming no email
        # When they are pressed at B's site, Then the bad-link page, nothing done, and the log says why
        with caplog.at_level(logging.DEBUG):
            assert _post(shop_b, b, "/unsubscribe", unsubscribe, ONE_CLICK)[0] == 400
            assert _post(shop_b, b, "/feedback", rating, b"comment=")[0] == 400
            assert _post(shop_b, b, "/unsubscribe", customer_alone, ONE_CLICK)[0] == 400
        assert opstore.suppressions(b) == [] and opstore.feedback(b) == []
        reasons = [(str(e["route"]), str(e["reason"])) for e in _rejections(caplog)]
        assert "no email to the customer with its Message-ID" in reasons[0][1], reasons
        assert "no feedback request for the order" in reasons[1][1], reasons
        assert "has mailed the customer nothing" in reasons[2][1], reasons
        assert unsubscribe not in caplog.text and rating not in caplog.text and "@example" not in caplog.text
        assert customer_alone not in caplog.text
        # And at A's site, whose ledger has the email (its Message-ID on A's domain) and the feedback request, they
        # work as they always did
        assert _post(shop_a, a, "/feedback", rating, b"comment=")[0] == 200
        assert [(f.order_ref, f.score) for f in opstore.feedback(a)] == [("1", 2)]
        assert _post(shop_a, a, "/unsubscribe", unsubscribe, ONE_CLICK)[0] == 200
        assert [s["email"] for s in opstore.suppressions(a)] == ["ani@example.com"]
        assert _post(shop_a, a, "/unsubscribe", customer_alone, ONE_CLICK)[0] == 200  # A mailed its customer 1


def test_a_link_of_before_naming_no_email_shows_another_shops_customer_nothing(
    tmp_path: Path, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given shop B, with the same key as shop A, whose customer 1 (bayu@example.net) B's ledger has never mailed,
    # and A's link of before naming no email (``u:1`` signed for no shop: A's customer 1's, Ani's)
    with _two_shops(tmp_path, smtp_server) as ((a, shop_a), (b, shop_b), _bound, _ratings):
        customer_alone = tokens.sign("u", "1", LINK_KEY.encode(), shop="")
        # When Ani opens it at B's site over HTTP (or a mail scanner fetches it)
        with caplog.at_level(logging.INFO):
            reply = _get(shop_b, b, "/unsubscribe", customer_alone)
        # Then the bad-link page, as its POST gets: not a button to unsubscribe B's customer, masked address shown
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
        assert b"b***@example.net" not in reply and b"example.net" not in reply
        assert "has mailed the customer nothing" in str(_rejections(caplog)[0]["reason"])
        assert opstore.suppressions(b) == []
        # And at A's site, which mailed its customer 1, the confirmation page for Ani's address
        reply = _get(shop_a, a, "/unsubscribe", customer_alone)
        assert reply.startswith(b"HTTP/1.1 200 ") and b"a***@example.com" in reply, reply[:200]
        assert opstore.suppressions(a) == []


def test_an_old_link_opened_many_times_at_once_reads_the_ledger_once_and_answers_every_request(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    # Given shop A's link of before naming no email, which each request checks by a read of the whole ledger (slow
    # on a big one: held here until every request has come)
    requests = 30
    reads: list[int] = []
    release = threading.Event()
    real = opstore.mailed_addresses

    def slow_read(store: Store, customer_id: int) -> list[str]:
        reads.append(customer_id)
        release.wait(30)
        return real(store, customer_id)

    monkeypatch.setattr(opstore, "mailed_addresses", slow_read)
    with _two_shops(tmp_path, smtp_server) as ((a, shop_a), _b, _bound, _ratings):
        customer_alone = tokens.sign("u", "1", LINK_KEY.encode(), shop="")
        site = Site(store=AsyncStore(a), keys=[LINK_KEY.encode()], settings=lambda: shop_a, clock=FakeClock(NOW),
                    metrics=Metrics(), paused=lambda: False)  # fmt: skip
        raw = f"GET /unsubscribe?t={customer_alone} HTTP/1.1\r\nHost: shop\r\n\r\n".encode()

        async def many_at_once() -> list[bytes]:
            server = HttpServer(site.handle, host="127.0.0.1", port=0, max_connections=requests + 5)
            port = await server.start()
            try:
                async def one() -> bytes:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(raw)
                    await writer.drain()
                    try:
                        return await asyncio.wait_for(reader.read(), 30)
                    finally:
                        writer.close()

                # When the link is opened 30 times at once (a customer's impatient clicks, a scanner, a script)
                replies = asyncio.gather(*(one() for _ in range(requests)))
                while not reads:  # the first read has begun; the others come while it is under way
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)
                release.set()
                return await replies
            finally:
                await server.close()

        try:
            replies = asyncio.run(many_at_once())
        finally:
            release.set()
            site.store.close()

    # Then every request gets its page, from one read of the ledger, not one each (which held a connection each,
    # one read at a time, until the server had none left for anyone else)
    assert all(r.startswith(b"HTTP/1.1 200 ") and b"a***@example.com" in r for r in replies), [r[:80] for r in replies]
    assert reads == [1], reads


def test_a_rating_link_of_before_is_not_taken_for_the_order_whose_shop_number_is_its_database_id(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """A rating link names its order by database id (``f:<order id>:<score>``). One signed for no shop was taken as
    this shop's when its ledger had a feedback request for the order whose *shop* number is those digits (shops
    number their orders 1, 2, 3…): shop A's link for its order 1 recorded a rating at shop B for B's database
    order 1, an order B never asked about, because B had asked about its order numbered "1" (database id 2)."""
    with _two_shops(tmp_path, smtp_server) as ((_a, _shop_a), _b, _bound, ratings):
        # Given shop B with the same key, whose database order 1 (B-100, cancelled) was never asked about, and whose
        # order numbered "1" (database id 2) got a feedback request
        b = make_shop(f"sqlite:///{tmp_path / 'b-numbered'}.db",
                      [customer("C1", email="bayu@example.net"), customer("C2", email="citra@example.net")],
                      [one_time_order("B-100", "C1", days_ago=8, status=OrderStatus.CANCELLED),
                       one_time_order("1", "C2", days_ago=8)])  # fmt: skip
        try:
            shop_b = _settings(b, "toko-b.example", smtp_server.port)
            assert run_cycle(shop_b, b, FakeClock(NOW)).dispatched.outcomes == {"sent": 1}
            # When A's rating link of before for its order 1 (f:1:2, signed for no shop) is pressed at B's site
            status, _page = _post(shop_b, b, "/feedback", _unbound(ratings[2]), b"comment=")
            # Then it is refused, and B has no rating for an order it never asked about
            assert status == 400
            assert opstore.feedback(b) == []
            # while B's own link of before, for the order it asked about (database id 2), works
            own = tokens.sign("f", "2:5", LINK_KEY.encode(), shop="")
            assert _post(shop_b, b, "/feedback", own, b"comment=")[0] == 200
            assert [(f.order_ref, f.score) for f in opstore.feedback(b)] == [("2", 5)]
        finally:
            b.close()
