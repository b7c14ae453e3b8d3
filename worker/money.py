"""Money as integers in the currency's minor unit (ISO 4217 exponent), never float."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from functools import lru_cache

from babel.numbers import get_currency_precision, is_currency

_EXPONENTS = {"IDR": 2}
"""Where Kembali's minor units differ from CLDR's (which Babel gives for every other ISO 4217 code): Rupiah amounts
are kept with 2 decimals (``249000.50``), as the ISO 4217 exponent has them, though CLDR prints none."""
_NOT_MONEY = frozenset({"XXX", "XTS"})
"""ISO 4217's "no currency" and "for testing" codes."""


@lru_cache(maxsize=64)  # Babel's look-up takes ~4 µs, and an import asks once per row
def known(currency: str) -> bool:
    """An ISO 4217 currency code (any letter case) whose minor units Kembali knows."""
    code = currency.upper()
    return code in _EXPONENTS or (len(code) == 3 and code not in _NOT_MONEY and is_currency(code))


@lru_cache(maxsize=64)
def exponent(currency: str) -> int:
    """The currency's minor units (2 for IDR, 0 for JPY, 3 for KWD); 2 for a code it does not know."""
    code = currency.upper()
    if code in _EXPONENTS:
        return _EXPONENTS[code]
    return int(get_currency_precision(code)) if known(code) else 2


def to_minor(amount: str | Decimal | int, currency: str) -> int:
    """Parse a major-unit amount ("249000", "249000.50") into minor units.

    Raises ValueError on anything that is not an exact, non-negative amount.
    """
    try:
        value = Decimal(str(amount).strip())
    except InvalidOperation:
        raise ValueError(f"not a number: {amount!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"not a non-negative amount: {amount!r}")
    scaled = value.scaleb(exponent(currency))
    if scaled != scaled.to_integral_value():
        raise ValueError(f"too many decimal places for {currency}: {amount!r}")
    return int(scaled)


def from_minor(minor: int, currency: str) -> Decimal:
    return Decimal(minor).scaleb(-exponent(currency))
