"""Plain values shared by every stage: no I/O, no ORM, no library types.

Records (``CustomerRecord`` …) are what the importer produces and the store
upserts. Snapshots and facts are what the store hands to the pure core.
``PlannedMessage`` is what planning produces; ``RenderedEmail`` is what
rendering produces; ``SendResult`` is what a transport reports.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, TypeVar
from zoneinfo import available_timezones

SMTP_ADDRESS = re.compile(r"[!#-'*+\-./0-9=?A-Z^-~]+@[A-Za-z0-9.\-\[\]:]+", re.ASCII)
"""An address as the SMTP transport writes it in MAIL FROM and RCPT TO: dot-atom local part characters, @, a domain
(letters, digits, dots, hyphens; an IDN in its xn-- form) or an address literal; anything else it refuses."""


@functools.cache
def place_zones() -> frozenset[str]:
    """The IANA time zones that say where a customer or a shop is: the zone database's names (``posix/…`` and
    ``right/…`` copies left out, as ``available_timezones`` does) but ``localtime``, the zone of whichever host
    reads it (another on each), and ``Factory``, a placeholder that reads every time as "-00"."""
    return frozenset(available_timezones()) - {"localtime", "Factory", "posixrules"}


_CLOCK_ZONES = {"WIB": "Asia/Jakarta", "WITA": "Asia/Makassar", "WIT": "Asia/Jayapura"}
"""Indonesia's zones as clocks and shops name them (Waktu Indonesia Barat, Tengah, Timur)."""


def zone_meant(name: str) -> str | None:
    """The IANA zone a name that is none most likely means: Indonesia's ``WIB``/``WITA``/``WIT``, a zone's name in
    another case (``asia/jakarta``), its city alone (``Jakarta``, ``New York``) or with a letter or two wrong
    (``America/New_Yrok``, ``Europe/Londn``); None when there is no such one."""
    upper = name.strip().upper()
    return _CLOCK_ZONES.get(upper) or _zones_by_upper_case().get(upper) or _zone_near(upper)


@functools.cache
def _zones_by_upper_case() -> dict[str, str]:
    return {zone.upper(): zone for zone in sorted(place_zones())}


_AREAS = frozenset({"Africa", "America", "Antarctica", "Arctic", "Asia", "Atlantic", "Australia", "Europe", "Indian",
                    "Pacific"})


@functools.cache
def _zones_by_city() -> dict[str, str]:
    """``JAKARTA`` → ``Asia/Jakarta``: the last part of each name in a continent or an ocean (not ``Etc/GMT+7``,
    which is UTC-7, not the "GMT+7" a clock shows, nor ``US/Pacific``); of two names for one city
    (America/Indianapolis, America/Indiana/Indianapolis) the first in order."""
    out: dict[str, str] = {}
    for zone in sorted(place_zones()):
        if zone.split("/", 1)[0] in _AREAS and "/" in zone:
            out.setdefault(zone.rsplit("/", 1)[1].upper(), zone)
    return out


@functools.lru_cache(maxsize=256)
def _zone_near(upper: str) -> str | None:
    """The zone whose city is ``upper`` (spaces for underscores), else whose name is within a letter or two of it
    (cached: a file's rows repeat a mistake)."""
    city = _zones_by_city().get(upper.replace(" ", "_"))
    if city is not None:
        return city
    # only a name of a continent's or an ocean's: the short old names of countries (Poland, Egypt) are a letter or
    # two from the names of cities elsewhere ('Portland' is not Warsaw's)
    near = difflib.get_close_matches(upper, _zones_in_areas_by_upper_case(), n=1, cutoff=0.85)
    return _zones_by_upper_case()[near[0]] if near else None


@functools.cache
def _zones_in_areas_by_upper_case() -> list[str]:
    return [upper for upper, zone in _zones_by_upper_case().items() if zone.split("/", 1)[0] in _AREAS and "/" in zone]


_T = TypeVar("_T")


def pickled_by_fields(cls: type[_T]) -> type[_T]:
    """Pickle a frozen slots dataclass as ``cls(*fields)``. The default for slots classes calls
    ``dataclasses.fields()`` on every object, both ways: several microseconds per message when
    batches cross to the compose helper process (``worker.composing``)."""
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def __reduce__(self: Any) -> tuple[type[_T], tuple[Any, ...]]:
        return cls, tuple([getattr(self, name) for name in names])

    cls.__reduce__ = __reduce__  # type: ignore[method-assign]
    return cls


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def mailbox(address: str) -> str:
    """The mailbox an address reaches, as a key: its ASCII letters in lower case. ``Budi@Example.com`` and
    ``budi@example.com`` are one mailbox at every real provider, and a shop's guest checkouts can give one
    person several customer records with one address: the frequency cap and the suppression list count per
    mailbox. SQL's ``lower()`` gives the same for the ASCII addresses imports store."""
    return address.translate(_ASCII_LOWER)


class Locale(enum.StrEnum):
    """The languages templates exist in."""

    ID = "id"
    """Bahasa Indonesia (the default)."""
    EN = "en"
    """English."""


class OrderStatus(enum.StrEnum):
    """Where an order is in the shop's life cycle."""

    PLACED = "placed"
    """Ordered, not yet paid or shipped."""
    PAID = "paid"
    """Paid, not yet shipped."""
    SHIPPED = "shipped"
    """Handed to the courier."""
    DELIVERED = "delivered"
    """Received by the customer."""
    CANCELLED = "cancelled"
    """Cancelled: never counts as a purchase."""
    REFUNDED = "refunded"
    """Paid back: never counts as a purchase."""

    @property
    def counts_as_purchase(self) -> bool:
        return self not in (OrderStatus.CANCELLED, OrderStatus.REFUNDED)

    @property
    def is_paid(self) -> bool:
        """Paid, shipped or delivered (not one placed and not paid yet, cancelled or refunded): what a loyalty
        milestone counts and a feedback request may ask about."""
        return self in (OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.DELIVERED)

    @property
    def can_be_rated(self) -> bool:
        """Paid, shipped or delivered: a feedback request may ask about it (not one placed and never paid)."""
        return self.is_paid


class MessageStatus(enum.StrEnum):
    """A ledger row's state. Terminal: sent, failed, skipped, uncertain."""

    PLANNED = "planned"
    """Created by planning; waits for ``next_attempt_at``."""
    CLAIMED = "claimed"
    """Taken by a worker (with a lease); no SMTP byte sent yet."""
    SENDING = "sending"
    """Committed right before the first SMTP byte of an attempt."""
    RETRY = "retry"
    """A transient failure; waits for ``next_attempt_at``."""
    SENT = "sent"
    """The server accepted the message (2xx after DATA)."""
    FAILED = "failed"
    """A permanent failure, a render error, or attempts exhausted."""
    SKIPPED = "skipped"
    """Not sent on purpose; ``skip_reason`` says why."""
    UNCERTAIN = "uncertain"
    """The mail may have arrived (connection lost after the final dot, or a
    worker died while sending). Never resent automatically."""

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {MessageStatus.SENT, MessageStatus.FAILED, MessageStatus.SKIPPED, MessageStatus.UNCERTAIN}
)


class SkipReason(enum.StrEnum):
    """Why a planned message was not sent."""

    SUPPRESSED = "suppressed"
    """The address is on the suppression list."""
    NO_CONSENT = "no_consent"
    """The customer withdrew marketing consent."""
    ORDERED_SINCE = "ordered_since"
    """The customer ordered again after the message was planned (win-back), or after the news (new products)."""
    NO_LONGER_DUE = "no_longer_due"
    """The campaign's rule no longer holds: the order it is about was cancelled or refunded (or, to rate, is
    another customer's now), the birthday was
    changed or removed, the milestone is no longer reached, nothing launched is new any more, the win-back step's
    time has passed (the next step is due) or its order is older than ``give_up_after_days``."""
    CAPPED = "capped"
    """The frequency cap left no slot."""
    EXPIRED = "expired"
    """The message's expiry passed before it could be sent."""
    HELD_OUT = "held_out"
    """The customer is in the campaign's holdout group."""
    CUSTOMER_GONE = "customer_gone"
    """The customer record no longer exists."""
    MERGED = "merged"
    """A loyalty spend milestone that became due in the same planning pass as an order-count one (the 5th order that
    also takes the spend past its threshold): it goes with that one's email (``payload["merged_into"]`` names its
    dedupe key), not in a second email of its own."""


class Outcome(enum.StrEnum):
    """What one SMTP attempt came to."""

    SENT = "sent"
    """Accepted by the server."""
    TRANSIENT = "transient"
    """Not delivered; worth retrying later (4xx, drop before DATA ended)."""
    PERMANENT = "permanent"
    """Not delivered; retrying will not help (5xx)."""
    AMBIGUOUS = "ambiguous"
    """Unknown: the connection died after the message was handed over."""
    RENDER_ERROR = "render_error"
    """The template failed for this message; nothing was sent."""
    THROTTLED = "throttled"
    """Not delivered because the server asked us to slow down (421 once the session is open, 450/451/452/454
    whose text is about rate or volume: ``core.limits.is_throttling``): retried later, not counted against
    ``max_attempts``."""
    OPERATOR = "operator"
    """Not an SMTP attempt: an operator resent or closed the message (``kembali ledger``)."""


# --- records: what the importer produces and the store upserts -------------


@dataclass(frozen=True, slots=True)
class CustomerRecord:
    external_id: str
    email: str
    """Normalised by email-validator."""
    name: str
    locale: Locale
    time_zone: str
    """An IANA zone name, validated."""
    birthday: date | None
    marketing_consent: bool
    consent_basis: str
    """e.g. ``opt_in``, ``legitimate_interest``; empty when unknown."""
    consent_source: str
    """e.g. ``checkout``, ``newsletter_form``; empty when unknown."""
    absent: frozenset[str] = field(default=frozenset(), compare=False)
    """Optional columns the file did not have (not: had empty): an existing customer keeps what is stored in them
    (a file of consents alone does not reset languages, zones and birthdays); a new one gets the defaults above."""


@dataclass(frozen=True, slots=True)
class ProductRecord:
    external_id: str
    name: str
    category: str
    price_minor: int
    """Price in the currency's minor unit (see ``worker.money``)."""
    currency: str
    url: str
    image_url: str
    launched_at: datetime | None
    """Aware, UTC."""
    active: bool
    absent: frozenset[str] = field(default=frozenset(), compare=False)
    """Optional columns the file did not have: an existing product keeps what is stored in them (a file of prices
    alone does not make a discontinued product active again nor empty its category and links)."""


@dataclass(frozen=True, slots=True)
class OrderLineRecord:
    product_external_id: str
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True, slots=True)
class OrderRecord:
    external_id: str
    customer_external_id: str
    status: OrderStatus
    placed_at: datetime
    """Aware, UTC."""
    delivered_at: datetime | None
    total_minor: int
    currency: str
    lines: tuple[OrderLineRecord, ...] = ()
    paid_at: datetime | None = None
    """When it was paid, as the shop's file says (aware, UTC; None: not said, or not paid): the first time an order
    is seen paid, its ``shop_order.paid_at``."""
    absent: frozenset[str] = field(default=frozenset(), compare=False)
    """Optional columns the file did not have: an existing order keeps its stored ``delivered_at`` when the file
    has no such column."""


# --- what the store hands the core -----------------------------------------


_TITLES = frozenset({
    "bapak", "bpk", "pak", "ibu", "bu", "kak", "kakak", "mbak", "mba", "mas", "sdr", "sdri", "saudara", "saudari",
    "tuan", "nyonya", "ny", "nona", "nn", "dr", "drs", "dra", "ir", "prof", "h", "hj", "mr", "mrs", "ms", "miss",
    "i", "ni", "raden", "rd", "teuku", "tengku", "kh", "haji", "hajah", "hajjah", "ust", "ustadz", "ustaz",
    "ustadzah", "muh", "moh", "moch", "mochd", "mhd", "muhd", "mohd", "om", "tante", "bang", "abang", "teh",
    "teteh", "akang", "mpok",
})  # fmt: skip
"""Titles and forms of address before a name, casefolded, without the trailing dot (the family ones people
type too: ``Om Budi``, ``Tante Lina``, ``Bang Ucok``, ``Teh Rina``; not ``Koh``, ``Ci`` or ``Kang``, which are
family or given names as well); the Balinese ``I`` and
``Ni`` (``I Made Wirawan`` is greeted as Made); and the short forms of Muhammad written before the name people go
by (``Moh. Arif``, ``Muh Yusuf``)."""


_AFTER_A_DOT = re.compile(r"(?<=\.)(?=[^\W\d_])")
"""Between a dot and the letter right after it: ``M.Rizky`` is ``M.`` and ``Rizky``."""


_TWO_WORD_TITLES = frozenset({
    ("anak", "agung"), ("ida", "bagus"), ("ida", "ayu"), ("gusti", "ngurah"), ("gusti", "ayu"), ("gusti", "agung"),
    ("raden", "ajeng"), ("raden", "ayu"),
})  # fmt: skip
"""Balinese and Javanese titles of two words (``Anak Agung Gede``, ``I Gusti Ngurah Rai``, ``Raden Ajeng
Kartini``) whose words are names too (``Ida``, ``Agung``, ``Ayu``): a title only together."""


def _two_word_title(first: str, second: str) -> bool:
    return (first.casefold().rstrip("."), second.casefold().rstrip(".")) in _TWO_WORD_TITLES


_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
"""The Hangul fillers: letters to ``str.isalpha``, and blank on screen ("Halo Kak \u3164," greets no one)."""


def _has_letter(word: str) -> bool:
    return any(ch.isalpha() and ch not in _BLANK_LETTERS for ch in word)


def _not_a_name(word: str) -> bool:
    """A word no one is greeted by: a title, no letter at all, an initial or an abbreviation (``M.``, ``R``,
    ``Sdr.``: ``M. Rizky`` is Muhammad Rizky), an email address typed as the name."""
    return (
        word.casefold().rstrip(".") in _TITLES
        or not _has_letter(word)
        or word.endswith(".")
        or _initial(word)
        or "@" in word
    )


def _initial_or_address(word: str) -> bool:
    """``R.``, ``M`` or ``siti@example.com`` as the whole name: "Halo Kak R.," greets no one; nor ``Kakak``,
    which the templates say themselves ("Halo Kak Kakak,"); another title alone (``Ibu``) is still said."""
    return "@" in word or _initial(word.rstrip(".")) or word.casefold() in ("kak", "kakak")


def _initial(word: str) -> bool:
    """One letter of a script with capitals (``M``, ``Ö``): an initial; one of a script without (``李``) is a name."""
    return len(word) == 1 and word.isalpha() and word.upper() != word.lower()


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class CustomerSnapshot:
    """A customer as the core sees them (no ORM object ever leaves the store)."""

    id: int
    external_id: str
    email: str
    name: str
    locale: Locale
    time_zone: str
    birthday: date | None
    marketing_consent: bool
    stored_locale: str | None = None
    """The language stored for the customer when it is none Kembali has templates for (written into the database
    past the importer's check, e.g. ``fr``): ``locale`` is then the shop's (``shop.default_locale``)."""

    @property
    def first_name(self) -> str:
        """The name to greet the customer by: the first word of ``name`` after a title people type into
        checkout forms (``Ibu``, ``Bpk.``, ``Hj.``, ``Dr.``, ``Raden``…) and after initials and abbreviations
        (``M. Rizky``, ``Moh. Arif``: Muhammad), with a name typed in capitals or in lower case written the
        usual way (``SITI`` and ``siti`` → ``Siti``); "" when nothing is left, or only an initial or an email
        address typed as the name (the templates then write "Kakak" / "there")."""
        # a title or an initial typed without the space after its dot (``M.Rizky``, ``Hj.Siti``) is a word of
        # its own; an address typed as the name stays one word
        parts = [part for word in self.name.split()
                 for part in ([word] if "@" in word else _AFTER_A_DOT.split(word)) if part]  # fmt: skip
        while len(parts) > 1:
            if len(parts) > 2 and _two_word_title(parts[0], parts[1]):
                parts = parts[2:]
            elif _not_a_name(parts[0]):
                parts = parts[1:]
            else:
                break
        if not parts or not _has_letter(parts[0]) or _initial_or_address(parts[0]):
            return ""
        first = parts[0].rstrip(",;:")  # "Siti, Aminah": not "Halo Kak Siti,,"
        shouted_or_lower = first.isupper() or first.islower()
        if len(first) > 1 and shouted_or_lower and first.replace("-", "").replace("'", "").isalpha():
            return first.title()
        return first


@dataclass(frozen=True, slots=True)
class ProductView:
    """A product as templates see it."""

    external_id: str
    name: str
    category: str
    price_minor: int
    currency: str
    url: str
    image_url: str
    sold: int = 0
    """Units sold (purchases only), where the shop's catalogue is read (``Store.catalogue``); 0 elsewhere. A best seller
    is a product that sold: new-products' fallback shows no unsold product as what customers love."""


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """One order, reduced to what audience rules need."""

    external_id: str
    status: OrderStatus
    placed_at: datetime
    delivered_at: datetime | None = None
    total_minor: int = 0
    currency: str = "IDR"
    paid_at: datetime | None = None
    """When it was first seen paid (``shop_order.paid_at``); None: when placed, or never (the status says)."""


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What audience rules look at: the customer, their orders, their standing."""

    customer: CustomerSnapshot
    orders: tuple[OrderFacts, ...]
    suppressed: bool
    planned_keys: frozenset[str] = frozenset()
    """Dedupe keys this customer already has in the ledger."""


# --- planning, rendering, sending ------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedMessage:
    dedupe_key: str
    campaign: str
    step: int
    customer_id: int
    email: str
    due_at: datetime
    expires_at: datetime
    message_id: str
    """``<…@shop-domain>``, fixed at planning so a resend keeps it."""
    priority: int = 0
    payload: dict[str, str] = field(default_factory=dict)
    """Small campaign facts fixed at planning (e.g. the first order's id)."""
    held_out: bool = False
    """In the campaign's holdout group: stored as skipped (``held_out``), never sent."""

    @property
    def skip_reason(self) -> SkipReason | None:
        """Why the row is stored as skipped and never sent: held out, or a loyalty milestone merged into another
        one's email (``payload["merged_into"]``, see ``SkipReason.MERGED``); None for a row to send."""
        if self.held_out:
            return SkipReason.HELD_OUT
        if self.payload.get("merged_into"):
            return SkipReason.MERGED
        return None


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class RenderedEmail:
    subject: str
    html: str
    text: str
    template_version: str
    """A content hash of the template files used."""


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    code: int | None
    reply: str
    error_type: str = ""
    retry_after_seconds: float | None = None
    """A "try again in N seconds" hint from the server, when it gave one."""
    stage: str = ""
    """Where the attempt stopped (``worker.core.retry.STAGES``: ``connect``, ``auth``, ``mail``…); "" when not
    known. ``connect`` and ``auth`` failures are the server's or the configuration's, never the message's."""
    setup: str = ""
    """When the attempt stopped on the SMTP setup, a failure every message would meet alike until it is fixed
    (before MAIL FROM: STARTTLS or AUTH not offered, a certificate that fails verification, TLS against a
    plaintext port; at MAIL FROM or RCPT TO: a relay that wants a login): what to fix (``smtp.tls``,
    ``smtp.username``, ``smtp.host``, ``certificates``), and ``reply`` says how. "" otherwise."""


@dataclass(slots=True)
class SendStage:
    """Where an SMTP attempt that raised had got to (``Transport.send`` cancelled midway: no ``SendResult`` tells it),
    for its caller to judge whether anything of the message left (``worker.core.retry.BEFORE_DATA``); "" when not
    known (the safe side: it may have)."""

    stage: str = ""


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """A ledger row a worker has claimed (with a lease) and may now send."""

    id: int
    dedupe_key: str
    campaign: str
    step: int
    customer_id: int
    email: str
    message_id: str
    attempts: int
    """Attempts made before this one."""
    due_at: datetime
    expires_at: datetime
    payload: dict[str, str]
    resent_after_attempts: int = 0
    """Of ``attempts``, those made before an operator resent the message: ``sending.max_attempts`` counts the
    others."""
    unreadable: str = ""
    """What of the row could not be read as Kembali writes it (a payload that is no JSON object, a date and time in
    another format: an operator's edit, a copy cut short), "" when all of it could; such a message fails alone,
    its row named (``Composer.unreadable``), with ``payload`` empty and the times it lacks the epoch's."""

    def payload_id(self, key: str) -> int | None:
        """A row id planning wrote in the payload (``order_id``, ``first_order_id``); None when it is missing or is
        not one (a row edited by hand: the shop's order number 'O-17'), where ``int()``'s ValueError stopped every
        cycle at that row. A message naming an order that cannot be read is skipped as ``no_longer_due``."""
        value: object = self.payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        return None

    @property
    def attempt_since_resend(self) -> int:
        """This attempt's number (1-based) since the operator's last resend, or since planning without one."""
        return self.attempts + 1 - self.resent_after_attempts


@dataclass(frozen=True, slots=True)
class Disposition:
    """What becomes of a claimed message after an attempt (or a decision not to try)."""

    message: ClaimedMessage
    status: MessageStatus
    worker: str
    started_at: datetime
    finished_at: datetime
    result: SendResult | None = None
    """None when no attempt was made (a skip)."""
    skip_reason: SkipReason | None = None
    next_attempt_at: datetime | None = None
    template_version: str | None = None
    subject: str | None = None
    counts_as_attempt: bool = True
    """False for a throttled attempt: the row's ``attempts`` is given back."""
    reached_server: bool = True
    """False for an attempt that ended before the message reached the server, or that the server refused as it
    would every message (``core.retry.connection_failure``: a failure before RCPT TO, a refusal of the sender or of
    this client at RCPT TO, the account's limit reached at any stage): its mark gives back its slot of the day's
    quota, as a row given back unsent does."""
    suppress_reason: str | None = None
    """Set (e.g. ``hard_bounce``) to add the address to the suppression list with the outcome."""


@dataclass(frozen=True, slots=True)
class SendTimeFacts:
    """What the send-time re-check looks at, read right before sending."""

    customer: CustomerSnapshot | None
    suppressed: bool
    order_count: int
    last_order_at: datetime | None
    first_order_id: int | None = None
    """The first purchase's row id (win-back's only order)."""
    first_order_at: datetime | None = None
    """When the first purchase was placed (win-back: which step its age has reached); None when not read."""
    total_spent_minor: int = 0
    paid_order_count: int | None = None
    """Loyalty messages only: the orders paid (paid, shipped, delivered), what a milestone counts; None when not
    read (``order_count`` stands in)."""
    paid_spent_minor: int | None = None
    """Loyalty messages only: what the paid orders in the shop's currency add up to (None: not read)."""
