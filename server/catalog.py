"""The ad catalog as the ``ads`` topic says it is now (latest record per ad id), and the
organic catalogue as ``organic-items`` says it is (latest record per item id).

An ad is servable when its latest record is ``active`` with ``budget > 0`` *and* the
serving snapshot's id table has it (the second half is checked where the trie is
built, :mod:`server.models`). An organic item is servable, the same way, when its
latest record is ``active`` *and* the snapshot's ``organic_ids`` table has it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from server.beam import BID_TYPES
from server.metrics import CATALOG_ADS, CATALOG_ORGANIC
from streams.schemas import Ad, OrganicItem


def is_servable(ad: Ad | None) -> bool:
    return ad is not None and ad.status == "active" and ad.budget > 0


class AdCatalog:
    """Latest :class:`Ad` per id; readers get plain dict lookups (atomic in CPython)."""

    def __init__(self) -> None:
        self._ads: dict[str, Ad] = {}
        self._lock = threading.Lock()
        self.generation = 0

    def apply(self, updates: Iterable[tuple[str, Ad | None]]) -> bool:
        """Apply ``(ad_id, record or None for a tombstone)``; True if servability changed."""
        changed = False
        with self._lock:
            ads = dict(self._ads)
            for ad_id, ad in updates:
                before = is_servable(ads.get(ad_id))
                if ad is None:
                    ads.pop(ad_id, None)
                else:
                    ads[ad_id] = ad
                changed |= before != is_servable(ads.get(ad_id))
            self._ads = ads        # readers see the old dict or the new one, never half
            if changed:
                self.generation += 1
        CATALOG_ADS.set(len(ads))
        return changed

    def get(self, ad_id: str) -> Ad | None:
        return self._ads.get(ad_id)

    def __len__(self) -> int:
        return len(self._ads)

    def servable_mask(self, ad_ids: list[str]) -> np.ndarray:
        ads = self._ads
        return np.fromiter((is_servable(ads.get(a)) for a in ad_ids), dtype=bool,
                           count=len(ad_ids))

    def bids(self, ad_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray, list[Ad | None]]:
        """(bid [M] float64, bid type code [M], records) for ``ad_ids``."""
        ads = self._ads
        recs = [ads.get(a) for a in ad_ids]
        bid = np.array([r.bid if r is not None else 0.0 for r in recs], dtype=np.float64)
        kind = np.array([BID_TYPES.index(r.bid_type) if r is not None else -1 for r in recs],
                        dtype=np.int64)
        return bid, kind, recs


def is_organic_servable(item: OrganicItem | None) -> bool:
    return item is not None and item.status == "active"


class OrganicCatalog:
    """Latest :class:`OrganicItem` per id (``organic-items``), kept like
    :class:`AdCatalog`: a tombstone deletes the item, ``removed`` keeps it unservable."""

    def __init__(self) -> None:
        self._items: dict[str, OrganicItem] = {}
        self._lock = threading.Lock()
        self.generation = 0

    def apply(self, updates: Iterable[tuple[str, OrganicItem | None]]) -> bool:
        """Apply ``(item_id, record or None for a tombstone)``; True if servability
        changed."""
        changed = False
        with self._lock:
            items = dict(self._items)
            for item_id, item in updates:
                before = is_organic_servable(items.get(item_id))
                if item is None:
                    items.pop(item_id, None)
                else:
                    items[item_id] = item
                changed |= before != is_organic_servable(items.get(item_id))
            self._items = items
            if changed:
                self.generation += 1
        CATALOG_ORGANIC.set(len(items))
        return changed

    def get(self, item_id: str) -> OrganicItem | None:
        return self._items.get(item_id)

    def __len__(self) -> int:
        return len(self._items)

    def servable_mask(self, item_ids: list[str]) -> np.ndarray:
        items = self._items
        return np.fromiter((is_organic_servable(items.get(i)) for i in item_ids), dtype=bool,
                           count=len(item_ids))
