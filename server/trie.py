"""Prefix trie over the full ids of servable ads, as flat numpy arrays (CSR per level).

Level ``t`` connects nodes for prefixes of length ``t`` (level 0: the single root) to
nodes for prefixes of length ``t + 1``: the children of node ``n`` are the entries
``offsets[t][n] : offsets[t][n + 1]`` of ``codes[t]`` (the local code chosen at level
``t``) and ``child[t]`` (the node reached). At the last level the node reached is a
leaf, and ``rows[leaf]`` is the ad's row in the snapshot's id table, so every path
through the trie is exactly one servable ad.

Building is a few vectorized passes over the sorted id table, so a rebuild after an
``ads`` event is cheap; tries are immutable and swapped by reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Trie:
    level_sizes: tuple[int, ...]
    offsets: tuple[np.ndarray, ...]   # per level: [n_nodes_t + 1] int64
    codes: tuple[np.ndarray, ...]     # per level: [n_edges_t] int64
    child: tuple[np.ndarray, ...]     # per level: [n_edges_t] int64
    rows: np.ndarray                  # [n_leaves] int64: leaf -> row in the id table

    @property
    def id_len(self) -> int:
        return len(self.level_sizes)

    @property
    def n_ads(self) -> int:
        return int(self.rows.shape[0])

    def expand(self, level: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All children of ``nodes`` (prefix nodes at ``level``) as flat edge lists:
        (index into ``nodes`` [M], code [M], child node [M])."""
        off = self.offsets[level]
        start = off[nodes]
        count = off[nodes + 1] - start
        total = int(count.sum())
        owner = np.repeat(np.arange(nodes.shape[0]), count)
        first = np.cumsum(count) - count
        pos = np.arange(total) - np.repeat(first - start, count)
        return owner, self.codes[level][pos], self.child[level][pos]


def sort_ids(ids: np.ndarray) -> np.ndarray:
    """The lexicographic order of id rows (computed once per snapshot)."""
    if ids.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort(ids.T[::-1]).astype(np.int64)


def build_trie(ids: np.ndarray, order: np.ndarray, servable: np.ndarray,
               level_sizes: Sequence[int]) -> Trie:
    """Trie over ``ids[r]`` for the rows ``r`` with ``servable[r]``.

    ``ids`` [n, T] int64, ``order`` = :func:`sort_ids(ids)`, ``servable`` [n] bool.
    Rows with a duplicate full id keep only the first (one path, one ad).
    """
    sel = order[servable[order]]
    sub = ids[sel]
    m, T = sub.shape[0], len(level_sizes)
    offsets: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    child: list[np.ndarray] = []
    parent_node = np.zeros(m, dtype=np.int64)   # node of each row's prefix of length t
    n_parents = 1
    changed = np.zeros(m, dtype=bool)
    if m:
        changed[0] = True
    for t in range(T):
        if m > 1:
            changed[1:] |= sub[1:, t] != sub[:-1, t]
        node = np.cumsum(changed) - 1                    # node of prefix length t + 1
        edges = np.flatnonzero(changed)                  # first row of each new node
        edge_parent = parent_node[edges]
        offsets.append(np.searchsorted(edge_parent, np.arange(n_parents + 1)).astype(np.int64))
        codes.append(sub[edges, t].astype(np.int64))
        child.append(node[edges].astype(np.int64))
        parent_node = node
        n_parents = int(edges.shape[0])
    leaves = np.flatnonzero(changed)
    rows = sel[leaves].astype(np.int64)
    return Trie(tuple(int(s) for s in level_sizes), tuple(offsets), tuple(codes), tuple(child),
                rows)
