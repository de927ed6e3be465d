"""Trie-constrained beam search with per-level widths, value rescoring and slate ranking.

Plain functions over numpy arrays: the model enters only through two callables, so
the search is tested without HTTP or onnxruntime.

* ``step(beam_request, prefix) -> logits``: ``beam_request`` [N] is the request of
  each live beam, ``prefix`` [N, t] the codes chosen so far; ``logits`` [N, V_max]
  scores the next level (``decoder_step.onnx`` after gathering each beam's encoder
  states).
* per level, logits are masked to the beam's children in the trie, log-softmaxed
  over those children (``renormalize``) and added to the beam's score; each request
  keeps its ``widths[t]`` best children.
* the final beams are full ids of servable ads (trie leaves); :func:`rank_slates`
  orders them by expected value from the value heads and the ad's bid
  (CPC bid·pCTR, CPA bid·pCTR·pCVR, CPM bid/1000), ties by sequence log-probability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.trie import Trie

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

BID_TYPES = ("cpc", "cpa", "cpm")
"""Index of each bid type in ``bid_type`` code arrays."""


@dataclass(frozen=True)
class Beams:
    """Final beams of a batch, grouped by request (request-major, best first)."""

    request: np.ndarray   # [M] int64 request index
    ids: np.ndarray       # [M, T] int64 full ids
    rows: np.ndarray      # [M] int64 row in the snapshot's id table
    logprob: np.ndarray   # [M] float64 summed log-probability


def beam_search(step: StepFn, trie: Trie, n_requests: int, widths: Sequence[int],
                renormalize: bool = True, skip_forced: bool = True,
                caps: Sequence[int] | np.ndarray | None = None) -> Beams:
    """Constrained beam search for ``n_requests`` requests with ``widths[t]`` per level.
    ``skip_forced`` (default): no model call for beams with a single allowed child (the
    same beams and scores; off only to measure what it saves). ``caps`` [n_requests]:
    request ``b`` keeps at most ``min(widths[t], caps[b])`` beams per level, so requests
    of one batch can search with widths of their own (each gets the beams it would get
    searched alone)."""
    T = trie.id_len
    if len(widths) != T or min(widths) < 1:
        raise ValueError(f"need {T} beam widths >= 1, got {list(widths)}")
    B = n_requests
    cap: np.ndarray | None = None
    if caps is not None:
        cap = np.asarray(caps, dtype=np.int64)
        if cap.shape != (B,) or (B and int(cap.min()) < 1):
            raise ValueError(f"need {B} per-request caps >= 1, got {cap.tolist()}")
    req = np.arange(B, dtype=np.int64)                 # live beams, request-major
    node = np.zeros(B, dtype=np.int64)
    score = np.zeros(B, dtype=np.float64)
    prefix = np.zeros((B, 0), dtype=np.int64)
    if trie.n_ads == 0 or B == 0:
        req = req[:0]
    for t in range(T):
        if req.shape[0] == 0:
            break
        V = trie.level_sizes[t]
        owner, code, child = trie.expand(t, node)      # edges from live beams
        N = req.shape[0]
        logits = _level_logits(step, req, prefix, owner, V, renormalize and skip_forced)
        edge_logit, lse = _edge_logits(logits, owner, code, N, renormalize)
        cand = score[owner] + edge_logit - lse[owner]
        # per-request top-w on a dense [B, k_max * V] table (slot = beam's rank in request)
        first = np.searchsorted(req, np.arange(B))
        slot = np.arange(N) - first[req]
        k_max = int(slot.max()) + 1
        cols = k_max * V
        table = np.full((B, cols), -np.inf)
        edge_at = np.zeros((B, cols), dtype=np.int64)
        r, c = req[owner], slot[owner] * V + code
        table[r, c] = cand
        edge_at[r, c] = np.arange(owner.shape[0])
        w = min(int(widths[t]), cols)
        top = np.argpartition(-table, w - 1, axis=1)[:, :w] if w < cols else \
            np.broadcast_to(np.arange(cols), (B, cols))
        top_val = np.take_along_axis(table, top, axis=1)
        rank = np.argsort(-top_val, axis=1, kind="stable")
        top = np.take_along_axis(top, rank, axis=1)
        top_val = np.take_along_axis(top_val, rank, axis=1)
        keep = np.isfinite(top_val)
        if cap is not None:
            keep &= np.arange(top_val.shape[1])[None, :] < cap[:, None]
        new_req = np.repeat(np.arange(B), keep.sum(axis=1))
        e = edge_at[np.arange(B)[:, None], top][keep]
        score = top_val[keep]
        prefix = np.concatenate([prefix[owner[e]], code[e][:, None]], axis=1)
        node = child[e]
        req = new_req
    if req.shape[0] == 0 or prefix.shape[1] != T:
        return Beams(np.zeros(0, np.int64), np.zeros((0, T), np.int64), np.zeros(0, np.int64),
                     np.zeros(0))
    return Beams(req, prefix, trie.rows[node], score)


def sequence_logprob(step: StepFn, trie: Trie, request: np.ndarray, ids: np.ndarray,
                     renormalize: bool = True) -> np.ndarray:
    """Log-probability [E] of the full ids ``ids`` [E, T] (trie paths) for the requests
    ``request`` [E], scored exactly as :func:`beam_search` scores a beam reaching them
    (an ad that is not a final beam, e.g. one drawn for exploration)."""
    E, T = ids.shape
    node = np.zeros(E, dtype=np.int64)
    score = np.zeros(E, dtype=np.float64)
    for t in range(T):
        if E == 0:
            break
        owner, code, child = trie.expand(t, node)
        logits = _level_logits(step, request, ids[:, :t], owner, trie.level_sizes[t],
                               renormalize)
        edge_logit, lse = _edge_logits(logits, owner, code, E, renormalize)
        hit = np.flatnonzero(code == ids[owner, t])    # one edge per id (owner-major)
        if hit.shape[0] != E:
            raise ValueError(f"ids are not paths of the trie at level {t}")
        score += edge_logit[hit] - lse
        node = child[hit]
    return score


def _edge_logits(logits: np.ndarray, owner: np.ndarray, code: np.ndarray, N: int,
                 renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(logit of each edge [M], log normalizer of each beam [N]): over the beam's allowed
    children when ``renormalize``, else over the whole level."""
    edge_logit = logits[owner, code]
    edge_logit = np.where(np.isfinite(edge_logit), edge_logit, -np.inf)
    if renormalize:                                    # log-softmax over allowed children
        peak = np.full(N, -np.inf)
        np.maximum.at(peak, owner, edge_logit)
        safe_peak = np.where(np.isfinite(peak), peak, 0.0)
        sumexp = np.zeros(N)
        np.add.at(sumexp, owner, np.exp(edge_logit - safe_peak[owner]))
        with np.errstate(divide="ignore"):
            lse = safe_peak + np.log(sumexp)
    else:                                              # log-softmax over the whole level
        peak = logits.max(axis=1)
        lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    return edge_logit, lse


def _level_logits(step: StepFn, req: np.ndarray, prefix: np.ndarray, owner: np.ndarray,
                  V: int, skip: bool) -> np.ndarray:
    """Next-level logits [N, V] of the live beams. ``skip`` (renormalized search only):
    renormalized over the allowed children, a beam with exactly one child adds log 1 = 0
    whatever the model says, so the model runs only for beams with a choice to make
    (most beams at the business and suffix levels); the others get zero logits, which
    score their single child 0."""
    N = req.shape[0]
    if not skip:
        return np.asarray(step(req, prefix), dtype=np.float64)[:, :V]
    need = np.flatnonzero(np.bincount(owner, minlength=N) > 1)
    logits = np.zeros((N, V))
    if need.size == N:
        logits[:] = np.asarray(step(req, prefix), dtype=np.float64)[:, :V]
    elif need.size:
        logits[need] = np.asarray(step(req[need], prefix[need]), dtype=np.float64)[:, :V]
    return logits


def pad_candidates(beams: Beams, n_requests: int) -> tuple[np.ndarray, np.ndarray]:
    """Final ids as ``candidates`` [B, C, T] for ``value.onnx`` plus each beam's column.
    Padding repeats a real id (or zeros for a request without beams)."""
    B, T = n_requests, beams.ids.shape[1]
    first = np.searchsorted(beams.request, np.arange(B))
    col = np.arange(beams.request.shape[0]) - first[beams.request]
    C = int(col.max()) + 1 if col.size else 1
    cand = np.zeros((B, C, T), dtype=np.int64)
    if col.size:
        counts = np.bincount(beams.request, minlength=B)
        fill = np.where(counts > 0, first, 0)
        cand[:] = beams.ids[np.minimum(fill, beams.ids.shape[0] - 1)][:, None, :]
        cand[beams.request, col] = beams.ids
    return cand, col


def expected_value(bid: np.ndarray, bid_type: np.ndarray, pctr: np.ndarray,
                   pcvr: np.ndarray) -> np.ndarray:
    """Expected value per impression; ``bid_type`` codes index :data:`BID_TYPES`."""
    cpc = bid * pctr
    return np.select([bid_type == 0, bid_type == 1, bid_type == 2],
                     [cpc, cpc * pcvr, bid / 1000.0], default=0.0)


def rank_slates(beams: Beams, ev: np.ndarray, ks: Sequence[int],
                allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """Per request, indices into ``beams`` of its top ``ks[b]`` by expected value
    (ties: higher log-probability). ``allowed`` [M] drops beams (e.g. an ad paused
    after the trie was built); non-finite values rank last."""
    ev = np.where(np.isfinite(ev), ev, -np.inf)
    order = np.lexsort((-beams.logprob, -ev, beams.request))
    out: list[np.ndarray] = []
    req_sorted = beams.request[order]
    for b, k in enumerate(ks):
        lo, hi = np.searchsorted(req_sorted, [b, b + 1])
        idx = order[lo:hi]
        if allowed is not None:
            idx = idx[allowed[idx]]
        out.append(idx[:k])
    return out
