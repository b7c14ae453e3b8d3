"""Money as integers in the currency's minor unit (ISO 4217 exponent), never float."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

# ISO 4217 exponents for the currencies a shop here is likely to use; others default to 2.
_EXPONENTS = {"IDR": 2, "USD": 2, "SGD": 2, "MYR": 2, "EUR": 2, "JPY": 0, "KRW": 0, "VND": 0}
CURRENCIES = tuple(_EXPONENTS)
"""The currencies whose minor units are known: the only ones ``shop.currency`` may name."""


def exponent(currency: str) -> int:
    return _EXPONENTS.get(currency.upper(), 2)


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
