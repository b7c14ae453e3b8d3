"""Signed link tokens: ``<payload>.<mac>``, both base64url, HMAC-SHA256 truncated to 128 bits.

The payload is ``kind:value`` (e.g. ``u:<customer id>:<Message-ID before the @>`` for unsubscribe), never an
email address. Tokens do not expire. ``verify`` accepts any of several keys so a
key can be rotated: sign with the newest, keep the old ones for verifying.

The MAC covers the shop too (``shop``: its ``shop.domain``, as ``shop_scope`` writes it), ahead of the payload and
not in the token's text: two shops whose operators chose the same key accept each other's links no more, and the
text keeps its format (a link is no longer). ``shop=""`` is a token of before: its MAC covers the payload alone
(``u:5`` of one shop is ``u:5`` of every shop with its key); whoever accepts such a token must find out otherwise
that it is theirs. A bound MAC's message starts with a digit (the shop's length) and an unbound one's with its
kind, a word of letters: no token of one sort verifies as the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def shop_scope(domain: str) -> str:
    """What a token is bound to for the shop whose ``shop.domain`` is ``domain``: a domain's case and a final dot
    name the same domain, and so the same shop."""
    return domain.strip().rstrip(".").lower()


def _mac(key: bytes, payload: bytes, shop: str) -> bytes:
    scope = shop.encode()
    message = f"{len(scope)}:".encode() + scope + payload if shop else payload
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_BYTES]


def sign(kind: str, value: str, key: bytes, *, shop: str) -> str:
    """The token for ``kind:value``, bound to ``shop`` (``shop_scope`` of its domain; ``""``: bound to none, as
    tokens were before, for tests of those)."""
    if not (kind.isascii() and kind.isalpha()):
        raise ValueError("kind must be a non-empty word of letters")
    payload = f"{kind}:{value}".encode()
    return f"{_b64(payload)}.{_b64(_mac(key, payload, shop))}"


def verify(token: str, keys: Sequence[bytes], *, shop: str) -> tuple[str, str] | None:
    """(kind, value) when the token was signed by one of ``keys`` for ``shop`` (``""``: a token bound to no shop,
    as they were before); None otherwise. Each part must be the very
    base64url that ``sign`` writes (padding ``=`` at its end aside, which a mail client may leave): decoding skips
    characters outside the alphabet and ignores the last character's unused bits, so tokens with characters
    added or changed were taken for the one signed."""
    try:
        payload_part, mac_part = token.split(".")
        payload, mac = _unb64(payload_part), _unb64(mac_part)
    except (ValueError, binascii.Error):
        return None
    if _b64(payload) != payload_part.rstrip("=") or _b64(mac) != mac_part.rstrip("="):
        return None
    if len(mac) != MAC_BYTES or not any(hmac.compare_digest(_mac(k, payload, shop), mac) for k in keys):
        return None
    try:
        kind, value = payload.decode("utf-8").split(":", 1)
    except (UnicodeDecodeError, ValueError):
        return None
    return kind, value
