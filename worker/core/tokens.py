"""Signed link tokens: ``<payload>.<mac>``, both base64url, HMAC-SHA256 truncated to 128 bits.

The payload is ``kind:value`` (e.g. ``u:<customer id>:<Message-ID before the @>`` for unsubscribe), never an
email address. Tokens do not expire. ``verify`` accepts any of several keys so a
key can be rotated: sign with the newest, keep the old ones for verifying.
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


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]


def sign(kind: str, value: str, key: bytes) -> str:
    if ":" in kind or not kind:
        raise ValueError("kind must be a non-empty word without ':'")
    payload = f"{kind}:{value}".encode()
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(token: str, keys: Sequence[bytes]) -> tuple[str, str] | None:
    """(kind, value) when the token was signed by one of ``keys``; None otherwise. Each part must be the very
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
    if len(mac) != MAC_BYTES or not any(hmac.compare_digest(_mac(k, payload), mac) for k in keys):
        return None
    try:
        kind, value = payload.decode("utf-8").split(":", 1)
    except (UnicodeDecodeError, ValueError):
        return None
    return kind, value
