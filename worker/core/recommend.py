"""Which products to suggest: pure ranking over plain values."""

from __future__ import annotations

from collections.abc import Sequence

from worker.domain import ProductView


def recommend(bought: Sequence[ProductView], catalogue: Sequence[ProductView], n: int) -> list[ProductView]:
    """Up to ``n`` products the customer did not buy: best sellers from the categories
    they bought from first, then the shop's best sellers. ``catalogue`` is best-first."""
    if n <= 0:
        return []
    owned = {p.external_id for p in bought}
    categories = {p.category for p in bought if p.category}
    picks: list[ProductView] = []
    seen: set[str] = set()
    for same_category_only in (True, False):
        for product in catalogue:
            if len(picks) == n:
                return picks
            if product.external_id in owned or product.external_id in seen:
                continue
            if same_category_only and product.category not in categories:
                continue
            picks.append(product)
            seen.add(product.external_id)
    return picks
