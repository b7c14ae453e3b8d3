"""What customers' clicks and operators' probes do: the daemon's HTTP routes.

* ``/unsubscribe?t=<token>``: GET shows a confirmation page with a button (mail
  scanners prefetch links, so a GET changes nothing); POST with
  ``List-Unsubscribe=One-Click`` (RFC 8058, also what the button sends)
  suppresses at once the address the email went to (the ledger row the token
  names by its Message-ID) and the customer's address now, when an import has changed it since,
  as the customer's own wish (one listed already as a bounce or an operator's entry is made theirs:
  ``opstore.unsubscribe``), and answers 200, no redirect, no cookie. A later import that gives the
  customer another address suppresses that one too (``shop.upsert_customers``): the unsubscribe is the person's.
  Idempotent. Senders re-check suppressions when they prepare a message and
  again in the transaction that marks it ``sending`` (``Store.record_and_mark``),
  so it holds in every worker for every message not marked yet.
* ``/feedback?t=<token>``: GET shows the rating named by the token with a
  button and a comment form, and changes nothing (mail scanners fetch every
  link of an email: were a GET to record, the first link a scanner fetched
  would be the rating); POST records it, once per order (the first wins; later
  ones are thanked and change nothing), with the comment (once).
* ``/healthz``: whether the daemon can do **all its work** (for a monitor). 200
  while it is up and can; 503 while it is starting (catch-up planning, before ``READY=1``) or
  stopping (the shutdown grace period), when the database cannot be reached, or
  when the dispatcher is paused. The JSON body's ``status`` says which:
  ``ok``, ``starting``, ``stopping`` or ``unhealthy``. It is no liveness probe:
  restarting cures none of these states (a restart during start-up or shutdown
  only starts it over); any answer at all, even a 503, shows the process alive.
* ``/readyz``: whether this process can **serve the links** (for a load balancer):
  503 only from the stop signal on and while the database cannot be reached (a
  paused dispatcher and the catch-up planning leave the links working).
* ``/metrics``: Prometheus text; while the database cannot be read (or does not
  answer within ``METRICS_DATABASE_SECONDS``), without the ledger's figures
  (``kembali_database_up 0``) but with this process's own.

A token that does not verify (forged, truncated, tampered, the wrong kind, or another shop's: tokens are signed
for ``shop.domain``, ``core.tokens``) gets a 400 page and changes nothing, and so does one signed for no shop (a link
of before) that this shop's ledger does not show its own (``Site.unsubscribe``, ``Site.feedback``); an unsubscribe
token whose customer the database lacks (restored from an older copy), a 404 page that says so and where to write.
A customer's click the database fails gets a 500
page that says sorry and to try again (an unsubscribe link's, the address to
write to meanwhile), in the shop's language and the other. Tokens name database
ids and Message-IDs, never an address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any, TypeVar

from worker import log, pages
from worker.adapters import opstore
from worker.adapters.store import suppression_address
from worker.adapters.web import Request, Response
from worker.asyncstore import AsyncStore
from worker.config import Settings
from worker.core import tokens
from worker.core.campaigns import rating_scores
from worker.core.pace import RelayPace
from worker.domain import CustomerSnapshot, Locale
from worker.metrics import Metrics
from worker.ports import Clock

T = TypeVar("T")

UNSUBSCRIBE_KIND = "u"
FEEDBACK_KIND = "f"
MAX_SCORE = 10
MAX_ORDER_REF = 100
MAX_MESSAGE_LOCAL = 200
COMMENT_MAX_CHARS = 2000
HEALTH_TIMEOUT_SECONDS = 3.0
METRICS_DATABASE_SECONDS = 5.0
"""How long a ``/metrics`` scrape waits for the ledger's figures: past it, the scrape is answered without them
(``kembali_database_up 0``), as when the database cannot be read; the read goes on, for the next scrape. A database
host that does not answer held the scrape for libpq's connect timeout (10 s) or the keepalives' minute, past
Prometheus's own scrape timeout (10 s): the scrape failed whole, the process's figures with it, during an outage."""


NOT_VERIFIED = "not signed with this shop's key, altered, cut short, or for another purpose"
UNBOUND_NO_EMAIL = ("signed for no shop (sent before links named theirs) and naming no email, and this shop's ledger "
                    "has mailed the customer nothing: another shop's with the same key?")
UNBOUND_NOT_IN_LEDGER = ("signed for no shop (sent before links named theirs), and this shop's ledger has no email to "
                         "the customer with its Message-ID: another shop's with the same key?")
UNBOUND_NO_REQUEST = ("signed for no shop (sent before links named theirs), and this shop's ledger has mailed no "
                      "feedback request for the order: another shop's with the same key?")
"""``link_rejected``'s reasons."""


@dataclass(frozen=True)
class Verified:
    """A token that verified: its value, and the shop domain it is signed for (None: a token signed for no shop)."""

    value: str
    domain: str | None


@dataclass(frozen=True)
class FeedbackToken:
    order_ref: str
    score: int


@dataclass(frozen=True)
class UnsubscribeToken:
    """An unsubscribe link's value: ``<customer id>:<Message-ID before the @>``, or ``<customer id>`` in the links
    emails carried before they named their email (those still work)."""

    customer_id: int
    message_local: str | None
    """The Message-ID of the email that carried the link, before ``@<shop domain>``: its ledger row, whose
    address is the one it went to."""

    def message_id(self, domain: str) -> str:
        return f"<{self.message_local}@{domain}>"


def parse_unsubscribe(value: str) -> UnsubscribeToken | None:
    """``<customer id>[:<Message-ID before the @>]`` → the parts, or None when malformed."""
    customer, colon, local = value.partition(":")
    if not (0 < len(customer) <= 18 and customer.isascii() and customer.isdigit()):
        return None
    if colon and not (0 < len(local) <= MAX_MESSAGE_LOCAL and local.isascii() and local.isprintable()):
        return None
    return UnsubscribeToken(int(customer), local if colon else None)


def parse_feedback(value: str) -> FeedbackToken | None:
    """``<order ref>:<score>`` → the parts, or None when malformed (score 0-10)."""
    order_ref, colon, score = value.rpartition(":")
    if not colon or not order_ref or len(order_ref) > MAX_ORDER_REF or not score.isdigit():
        return None
    number = int(score)
    return FeedbackToken(order_ref, number) if 0 <= number <= MAX_SCORE else None


def clean_comment(text: str) -> str:
    """A customer's comment as stored: line breaks as ``\\n``, other control characters dropped (PostgreSQL's
    text cannot hold a NUL; a terminal escape has no place in it), trimmed, at most ``COMMENT_MAX_CHARS``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kept = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    return kept.strip()[:COMMENT_MAX_CHARS]


class Site:
    """Routes requests to pages; every database call goes through the daemon's AsyncStore, but the one that reads
    the ledger whole (``_mailed_addresses``)."""

    def __init__(
        self,
        *,
        store: AsyncStore,
        keys: Sequence[bytes],
        settings: Callable[[], Settings],
        clock: Clock,
        metrics: Metrics,
        paused: Callable[[], bool],
        phase: Callable[[], str] = lambda: "running",
        waiting: Callable[[], int] = lambda: 0,
        relay_pace: Callable[[], RelayPace | None] = lambda: None,
    ) -> None:
        self.store = store
        self.keys = list(keys)
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.paused = paused
        self.phase = phase
        """The daemon's phase: ``starting``, ``running`` or ``stopping``."""
        self.waiting = waiting
        """The messages sent back to the ledger to wait for their domain's rate, not due yet (``queue_depth`` counts
        them: ``Daemon.waiting_for_domain_rate``)."""
        self.relay_pace = relay_pace
        """The dispatcher's global pace (``core.pace``; the current limiter's: a reload makes a new one)."""
        self._shared = _Shared()
        """The database reads under way, by what they read: the database ping (probes that come while it runs wait
        for it rather than start their own), the count of ``/metrics``, and the whole-ledger reads of unsubscribe
        links (the requests that ask the same meanwhile, one link clicked or POSTed again and again, wait for that
        one, not each for a read of its own, which held every connection the server allows, ``web.max_connections``,
        and answered the others 503)."""
        self._whole_ledger = asyncio.Lock()
        """Held while an unsubscribe link reads the ledger whole (one naming no email, or a Message-ID looked up in any
        case: ``_recipient``): one such read at a time."""

    async def handle(self, request: Request) -> Response:
        route = request.path.rstrip("/") or "/"
        if route in ("/unsubscribe", "/feedback"):
            try:
                return await (self.unsubscribe if route == "/unsubscribe" else self.feedback)(request)
            except Exception as exc:  # the database failed: a customer gets a page that says sorry, not a bare 500
                log.event("web_handler_failed", logging.ERROR, path=request.path, error=log.error_line(exc))
                mailto = self.settings().unsubscribe.mailto if route == "/unsubscribe" else ""
                return self._page(HTTPStatus.INTERNAL_SERVER_ERROR, pages.trouble(self._default_locale(), mailto))
        if route in ("/healthz", "/readyz", "/metrics") and request.method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        if route == "/healthz":
            return await self.healthz(request)
        if route == "/readyz":
            return await self.readyz(request)
        if route == "/metrics":
            return await self.prometheus(request)
        return self._page(HTTPStatus.NOT_FOUND, pages.not_found(self._default_locale()))

    # --- unsubscribe ------------------------------------------------------------

    async def unsubscribe(self, request: Request) -> Response:
        read = self._link(request, "unsubscribe", UNSUBSCRIBE_KIND, parse_unsubscribe)
        if isinstance(read, Response):
            return read
        verified, link = read
        s = self.store.store
        unbound = verified.domain is None  # a link signed for no shop: this shop's only if the ledger has its email
        thorough = unbound or request.method == "POST"
        mailed = await self._recipient(link, verified.domain, thorough) if link.message_local is not None else None
        if unbound and mailed is None and link.message_local is not None:
            return self._reject("unsubscribe", UNBOUND_NOT_IN_LEDGER, customer_id=link.customer_id)
        # one naming no email: its POST is refused unless this shop's ledger has mailed the customer, and so is its
        # GET, which showed another shop's customer's address (masked) and a button that did nothing
        if (unbound and link.message_local is None and request.method != "POST"
                and not await self._mailed_addresses(link.customer_id)):  # fmt: skip
            return self._reject("unsubscribe", UNBOUND_NO_EMAIL, customer_id=link.customer_id)
        customer = await self.store.call(opstore.customer, s, link.customer_id)
        locale = customer.locale if customer is not None else self._default_locale()
        shop = self.settings().shop.name
        if request.method != "POST":
            addresses, mailed_known = await self._addresses(link, mailed, customer, post=False)
            if not addresses:  # no such customer: a button would do nothing, and its page say it worked
                mailto = self.settings().unsubscribe.mailto
                return self._page(HTTPStatus.NOT_FOUND, pages.unknown_unsubscriber(self._default_locale(), mailto))
            # "already unsubscribed" only when the address the email went to is among those looked at: an old link
            # (or one the ledger does not find) shows the button, and its POST finds every address mailed; and only
            # of the customer's own wish: an address listed as a bounce or an operator's entry shows the button, whose
            # POST makes the entry the customer's (``opstore.unsubscribe``)
            if (mailed_known and addresses
                    and all([await self.store.call(opstore.unsubscribed, s, a) for a in addresses])):  # fmt: skip
                return self._page(HTTPStatus.OK, pages.unsubscribed(locale, shop))
            return self._page(HTTPStatus.OK, pages.confirm_unsubscribe(locale, shop, log.mask_emails(addresses)))
        if b"List-Unsubscribe" not in request.body or b"One-Click" not in request.body:
            return self._page(HTTPStatus.BAD_REQUEST, pages.bad_link(locale, self.settings().unsubscribe.mailto))
        addresses, mailed_known = await self._addresses(link, mailed, customer, post=True)
        if unbound and not mailed_known:  # one naming no email (every email's before 2026-12-05): this shop's only
            return self._reject("unsubscribe", UNBOUND_NO_EMAIL, customer_id=link.customer_id)  # if it mailed them
        if not addresses:  # the token names no address: nothing to suppress, and the customer is told so
            log.event("unsubscribe_unknown_customer", logging.WARNING, customer_id=link.customer_id)
            mailto = self.settings().unsubscribe.mailto
            return self._page(HTTPStatus.NOT_FOUND, pages.unknown_unsubscriber(self._default_locale(), mailto))
        created = await self.store.call(  # in one transaction: both, or neither and a 500
            opstore.unsubscribe, s, addresses, source="unsubscribe-link", now=self.clock.now()
        )
        masked = log.mask_emails(addresses)
        to, *also = masked
        extra: dict[str, Any] = {"also": ",".join(also)} if also else {}
        log.event("unsubscribed", customer=customer.external_id if customer is not None else None, to=to,
                  **extra, new=created > 0)  # fmt: skip
        return self._page(HTTPStatus.OK, pages.unsubscribed(locale, shop, masked))

    async def _recipient(self, link: UnsubscribeToken, bound: str | None, thorough: bool) -> str | None:
        """The address the link's email went to: the customer's ledger row whose Message-ID is the link's on
        this shop's domain, the one the token is signed for first (``shop.domain``, or one of
        ``shop.previous_domains``: emails sent before it changed), then the others, then each with a final dot (a
        Message-ID written while ``shop.domain`` had one); ``thorough`` (a link signed for
        no shop, which only such a row shows this shop's, or a POST), failing those, on any of them in any case (a
        Message-ID written while ``shop.domain`` had capitals: the ledger read whole). None: no such row."""
        s = self.store.store
        shop = self.settings().shop
        domains = dict.fromkeys([*([bound] if bound is not None else []), shop.domain, *shop.previous_domains])
        # then with a final dot: written so (the domain so written, before it was taken without one) it is the same
        message_ids = [link.message_id(d) for d in [*domains, *(f"{d}." for d in domains)]]
        for message_id in message_ids:
            found = await self.store.call(opstore.recipient, s, link.customer_id, message_id)
            if found is not None:
                return found
        if not thorough:
            return None
        return await self._read_whole_ledger(opstore.recipient_any_case, link.customer_id, tuple(message_ids))

    async def _addresses(
        self, link: UnsubscribeToken, recipient: str | None, customer: CustomerSnapshot | None, *, post: bool
    ) -> tuple[list[str], bool]:
        """What the link unsubscribes: the address its email went to (``recipient``, the ledger's), and the
        customer's address now. The person asked to stop: an address an import has changed since is theirs too. A
        link that names no email (issued before links did), or one the ledger does not find: on the POST, every
        address the customer was mailed at (the ledger is read whole for them: not for a GET). With whether the
        address (or addresses) mailed are among them: not for such a link's GET. Only for a link signed for this
        shop, or one signed for none whose email the ledger has (``unsubscribe``); one signed for none that names no
        email is refused, GET and POST, unless the ledger has mailed the customer."""
        mailed = [recipient] if recipient is not None else []
        if post and not mailed:
            mailed = await self._mailed_addresses(link.customer_id)
        current = [customer.email] if customer is not None else []
        unique: dict[str, str] = {}
        for address in [*mailed, *current]:
            unique.setdefault(suppression_address(address), address)
        return list(unique.values()), bool(mailed)

    async def _mailed_addresses(self, customer_id: int) -> list[str]:
        """``opstore.mailed_addresses``, on a thread of its own and one at a time. It reads the ledger whole (no
        index by customer: ~0.2 s a million rows on SQLite): on the AsyncStore's one thread it would hold back
        every call queued behind it, the senders' group commits among them, and a link POSTed again and again
        would stop sending."""
        return await self._read_whole_ledger(opstore.mailed_addresses, customer_id)

    async def _read_whole_ledger(self, read: Callable[..., T], *args: Any) -> T:
        """``read(store, *args)``, which reads the ledger whole: on a thread of its own, one such read at a time, and
        shared by the requests that ask the same meanwhile (``_shared``); one request gone (its client, its
        timeout) does not cancel it for the others."""
        async def one_at_a_time() -> T:
            async with self._whole_ledger:
                return await asyncio.to_thread(read, self.store.store, *args)

        return await self._shared.join((read.__name__, *args), one_at_a_time)

    # --- feedback ---------------------------------------------------------------

    async def feedback(self, request: Request) -> Response:
        read = self._link(request, "feedback", FEEDBACK_KIND, parse_feedback)
        if isinstance(read, Response):
            return read
        verified, parsed = read
        s = self.store.store
        if verified.domain is None and not await self.store.call(opstore.feedback_requested, s, parsed.order_ref):
            return self._reject("feedback", UNBOUND_NO_REQUEST, order=parsed.order_ref)
        locale = await self.store.call(opstore.order_locale, s, parsed.order_ref) or self._default_locale()
        shop = self.settings().shop.name
        now = self.clock.now()
        if request.method != "POST":  # GET, or HEAD (the same headers: the server leaves the body out)
            recorded = await self.store.call(opstore.feedback_for, s, parsed.order_ref)
            if recorded is None:
                stars = self._stars(parsed.score)
                return self._page(HTTPStatus.OK, pages.confirm_feedback(locale, shop, parsed.score, stars=stars))
            return self._page(HTTPStatus.OK, pages.feedback_thanks(locale, shop, recorded.score, recorded.comment,
                                                                   first=False, stars=self._stars(recorded.score)))
        created, row = await self.store.call(opstore.record_feedback, s, parsed.order_ref, parsed.score, now)
        if created:
            log.event("feedback_recorded", order=parsed.order_ref, score=parsed.score)
        if request.method == "POST":
            comment = clean_comment((request.form().get("comment") or [""])[0])
            if comment:
                updated = await self.store.call(opstore.add_feedback_comment, s, parsed.order_ref, comment, now)
                if updated is not None:
                    stored, row = updated
                    if stored:  # a later comment is thanked and kept nowhere
                        log.event("feedback_commented", order=parsed.order_ref, chars=len(row.comment or ""))
        return self._page(HTTPStatus.OK, pages.feedback_thanks(locale, shop, row.score, row.comment, first=created,
                                                               stars=self._stars(row.score)))

    # --- operators --------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Whether the daemon can do all its work: 503 while it starts or stops, its database is unreachable or its
        dispatcher is paused (what a monitor alerts on)."""
        database = await self._database()
        paused = self.paused()
        phase = self.phase()
        ok = database == "ok" and not paused and phase == "running"
        verdict = "ok" if ok else phase if phase != "running" else "unhealthy"
        return _probe(ok, {"status": verdict, "database": database, "dispatcher": "paused" if paused else "running"})

    async def readyz(self, request: Request) -> Response:
        """Whether this process can serve the customers' links: 503 only from the stop signal on and while its
        database is unreachable (what a load balancer routes by). A paused dispatcher (a relay's daily quota pauses
        it for an hour) and the start-up's catch-up planning do not keep a customer from unsubscribing."""
        database = await self._database()
        stopping = self.phase() == "stopping"
        ok = database == "ok" and not stopping
        verdict = "ok" if ok else "stopping" if stopping else "unhealthy"
        return _probe(ok, {"status": verdict, "database": database})

    async def _database(self) -> str:
        """``ok``, or why the database cannot be reached. The ping runs on a thread that a timeout cannot stop (a
        host that does not answer holds it until the driver's connect timeout): one at a time, shared by the probes
        that come meanwhile, so a probe every second cannot fill the threads that planning and ``/metrics`` need."""
        ping = self._shared.join(("ping",), lambda: asyncio.to_thread(opstore.ping, self.store.store))
        try:
            await asyncio.wait_for(ping, HEALTH_TIMEOUT_SECONDS)
        except Exception as exc:
            return f"unreachable: {type(exc).__name__}"
        return "ok"

    async def prometheus(self, request: Request) -> Response:
        settings = self.settings()
        read = self._shared.join(("metrics",), lambda: asyncio.to_thread(self._read_ledger, self.clock.now()))
        ledger: dict[tuple[str, str], int] | None
        depth: int | None
        try:
            ledger, depth = await asyncio.wait_for(read, METRICS_DATABASE_SECONDS)
        except Exception:  # the database is down or silent: the process's own figures matter all the more
            ledger, depth = None, None
        pace = self.relay_pace()
        text = self.metrics.render(
            ledger=ledger,
            queue_depth=depth + self.waiting() if depth is not None else None,
            rate_limit_per_second=settings.sending.rate_per_second,
            rate_burst=settings.sending.burst,
            paused=self.paused(),
            now=self.clock.monotonic(),
            relay_pace_per_second=pace.current if pace is not None else None,
            relay_slowed=pace is not None and pace.slowed,
        )
        return Response(HTTPStatus.OK.value, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _read_ledger(self, now: datetime) -> tuple[dict[tuple[str, str], int], int]:
        """Rows by (campaign, state), and the queue depth. A count of the whole ledger, which is never pruned: it
        runs on a thread of its own, not the store's (the dispatcher's claims and commits must not wait for it),
        and once for scrapes that come while it runs (they share its figures)."""
        s = self.store.store
        ledger: dict[tuple[str, str], int] = {}
        for (campaign, status, _reason), n in s.status_counts().items():
            ledger[(campaign, status)] = ledger.get((campaign, status), 0) + n
        return ledger, opstore.queue_depth(s, now)

    # --- helpers ----------------------------------------------------------------

    def _link(self, request: Request, route: str, kind: str,
              parse: Callable[[str], T | None]) -> tuple[Verified, T] | Response:  # fmt: skip
        """A link's request to ``route``: its token verified as of ``kind``, and its value as ``parse`` reads it;
        else the response refusing it (a method other than GET, HEAD and POST; a token not verified, or whose value
        does not parse)."""
        if request.method not in ("GET", "HEAD", "POST"):
            return _not_allowed("GET, HEAD, POST")
        token = _token(request)
        verified = self._verify(token, kind)
        parsed = parse(verified.value) if verified is not None else None
        if verified is None or parsed is None:
            return self._reject(route, NOT_VERIFIED)
        return verified, parsed

    def _verify(self, token: str | None, kind: str) -> Verified | None:
        """The token's value when it is of ``kind`` and signed with one of the keys: for this shop (its
        ``shop.domain``, or one of its ``shop.previous_domains``), or for no shop (a link sent before tokens named
        their shop; the caller must find it this shop's in the ledger). None otherwise: another shop's among them."""
        if not token or len(token) > 512:
            return None
        shop = self.settings().shop
        for domain in (shop.domain, *shop.previous_domains, None):
            verified = tokens.verify(token, self.keys, shop=tokens.shop_scope(domain) if domain is not None else "")
            if verified is not None:
                return Verified(verified[1], domain) if verified[0] == kind else None
        return None

    def _reject(self, route: str, why: str, **fields: Any) -> Response:
        """The bad-link page (an unsubscribe link's with the address to write to instead), and ``link_rejected``
        saying why: no token, nor address (a token names none)."""
        log.event("link_rejected", logging.WARNING, route=route, reason=why, **fields)
        mailto = self.settings().unsubscribe.mailto if route == "unsubscribe" else ""
        return self._page(HTTPStatus.BAD_REQUEST, pages.bad_link(self._default_locale(), mailto))

    def _stars(self, score: int) -> bool:
        """Whether ``score`` is a star rating (1-5), for the page to say so: the link names no scale, and the feedback
        request's is the config's (``campaigns.feedback.scale``, as ``stats`` reads the ratings); a score outside
        1-5 is out of 10 whatever the config says now (a link sent before the scale changed)."""
        return self.settings().campaigns.feedback.scale == "stars" and score in rating_scores("stars")

    def _default_locale(self) -> Locale:
        return Locale(self.settings().shop.default_locale)

    @staticmethod
    def _page(status: HTTPStatus, body: bytes) -> Response:
        return Response(status.value, body)


class _Shared:
    """Calls under way by key, each on a task of its own: one asked for while the same is under way is waited for,
    not started again, and a caller that stops waiting (its timeout, its client gone) does not cancel it for the
    others. One asked for after it ended starts anew."""

    def __init__(self) -> None:
        self._running: dict[tuple[object, ...], asyncio.Future[Any]] = {}

    def join(self, key: tuple[object, ...], start: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """The call ``key`` under way, else ``start()`` as it: a shield of it, to await."""
        running = self._running.get(key)
        if running is None or running.done():
            running = self._running[key] = asyncio.ensure_future(start())
            running.add_done_callback(lambda done: self._ended(key, done))
        return asyncio.shield(running)

    def under_way(self, key: tuple[object, ...]) -> bool:
        running = self._running.get(key)
        return running is not None and not running.done()

    def _ended(self, key: tuple[object, ...], done: asyncio.Future[Any]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved: its failure may come after every caller has stopped waiting


def _token(request: Request) -> str | None:
    form = request.form().get("t")
    return request.arg("t") or (form[0] if form else None)


def _not_allowed(allow: str) -> Response:
    return Response(HTTPStatus.METHOD_NOT_ALLOWED.value, b"method not allowed\n", "text/plain; charset=utf-8",
                    (("Allow", allow),))


def _probe(ok: bool, body: dict[str, str]) -> Response:
    """A probe's answer: 200 or 503, and its JSON body."""
    status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
    return Response(status.value, (json.dumps(body) + "\n").encode(), "application/json")
