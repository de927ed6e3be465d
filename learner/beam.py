"""Trie-constrained beam search over UA-SIDs (offline evaluation and benchmarks).

The search is one plain function over tensors, written against a small backend
interface (``encode`` / ``step``) so the same code runs the torch model
(:class:`TorchBackend`) or an exported snapshot's ONNX Runtime sessions
(:class:`OrtBackend`). The server has its own numpy implementation; this one is the
learner's reference.

Per-level beam widths ``(b_0, ..., b_{T-1})`` [reconstruction of GR4AD's dynamic
beam serving, mechanisms.md §1.6]: after level t at most b_t prefixes survive, and
the final beam is ranked by summed log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from learner.model import GenerativeRecommender
from snapshot_format import PRIOR_LOG_MIX, declared_feeds, session_options


class IdTrie:
    """Valid ids as dense child tables: ``children[t][node, token]`` is the node reached
    from ``node`` (a valid prefix of length t) by ``token``, or -1. At the last level the
    'node' is the ad's row in ``ids``."""

    def __init__(self, ids: np.ndarray, level_sizes: Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        n, T = ids.shape
        if len(level_sizes) != T:
            raise ValueError(f"ids have {T} tokens, level_sizes has {len(level_sizes)}")
        self.ids = ids
        self.level_sizes = tuple(int(s) for s in level_sizes)
        self.children: list[Tensor] = []
        parent = np.zeros(n, dtype=np.int64)
        n_parent = 1
        for t in range(T):
            if t < T - 1:
                _, child = np.unique(ids[:, : t + 1], axis=0, return_inverse=True)
                child = child.reshape(-1)
            else:
                child = np.arange(n)
            table = np.full((n_parent, self.level_sizes[t]), -1, dtype=np.int64)
            table[parent, ids[:, t]] = child
            self.children.append(torch.from_numpy(table))
            parent, n_parent = child, int(child.max()) + 1 if n else 1

    @property
    def id_len(self) -> int:
        return len(self.level_sizes)

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """Per id and level, the codes the served beam search chooses among: ids [N, T]
        -> [N, T, V_max] bool, the children of the id's prefix in this trie. The id's own
        code is always allowed; once a prefix leaves the trie (an ad no longer
        servable), every code of the level is."""
        ids = np.asarray(ids, dtype=np.int64)
        N, T = ids.shape
        V = max(self.level_sizes)
        out = np.zeros((N, T, V), dtype=bool)
        node = np.zeros(N, dtype=np.int64)
        rows = np.arange(N)
        for t in range(T):
            table = self.children[t].numpy()
            size = self.level_sizes[t]
            on = node >= 0
            out[on, t, :size] = table[node[on]] >= 0
            out[~on, t, :size] = True
            out[rows, t, ids[:, t]] = True
            nxt = np.full(N, -1, dtype=np.int64)
            nxt[on] = table[node[on], ids[on, t]]
            node = nxt if t < T - 1 else node
        return out


Encoded = tuple[Tensor, Tensor, Tensor, Tensor]
"""memory [B, S, D], memory_mask [B, S], lower [B, T, D], memory_kv [B, M, 2, h, S, D/h]."""


class Backend(Protocol):
    def encode(self, history: Tensor, history_mask: Tensor, context: Tensor) -> Encoded: ...

    def step(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
             beam_request: Tensor, prefix: Tensor) -> Tensor: ...


@runtime_checkable
class PriorBackend(Backend, Protocol):
    """A backend of a model that may have prior heads: the encoder also gives each
    request's log mixture over the leaf heads [B, L] (None without prior heads), which
    every step takes."""

    def encode_prior(self, history: Tensor, history_mask: Tensor,
                     context: Tensor) -> tuple[Encoded, Tensor | None]: ...

    def step_prior(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
                   beam_request: Tensor, prefix: Tensor,
                   prior_log_mix: Tensor | None) -> Tensor: ...


class TorchBackend:
    """The torch model in eager mode (inference mode: no autograd bookkeeping)."""

    def __init__(self, model: GenerativeRecommender) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def encode(self, history: Tensor, history_mask: Tensor, context: Tensor) -> Encoded:
        return self.model.encode(history, history_mask, context)

    @torch.inference_mode()
    def encode_prior(self, history: Tensor, history_mask: Tensor,
                     context: Tensor) -> tuple[Encoded, Tensor | None]:
        enc = self.model.encode(history, history_mask, context)
        return enc, self.model.prior_log_mix(enc[0], enc[1])

    @torch.inference_mode()
    def step(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
             beam_request: Tensor, prefix: Tensor) -> Tensor:
        return self.model.decoder.step(memory_kv, memory_mask, lower, beam_request, prefix)

    @torch.inference_mode()
    def step_prior(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
                   beam_request: Tensor, prefix: Tensor,
                   prior_log_mix: Tensor | None) -> Tensor:
        return self.model.decoder.step(memory_kv, memory_mask, lower, beam_request, prefix,
                                       prior_log_mix)

    @torch.inference_mode()
    def value(self, memory: Tensor, memory_mask: Tensor, candidates: Tensor,
              memory_kv: Tensor | None = None, context: Tensor | None = None,
              exposure: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pctr, pcvr = self.model.value(memory, memory_mask, candidates, memory_kv, context,
                                      exposure)
        return torch.sigmoid(pctr), torch.sigmoid(pcvr)


class OrtBackend:
    """A snapshot's ``encoder.onnx`` / ``decoder_step.onnx`` / ``value.onnx`` in ONNX
    Runtime (CPU execution provider unless ``providers`` says otherwise)."""

    def __init__(self, snapshot_dir: str | Path, providers: Sequence[str] | None = None,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        opts = session_options(threads)
        provs = list(providers or ["CPUExecutionProvider"])
        d = Path(snapshot_dir)
        self.sessions = {name: ort.InferenceSession(str(d / f"{name}.onnx"), opts,
                                                    providers=provs)
                         for name in ("encoder", "decoder_step", "value")}

    def run(self, name: str, **inputs: Tensor) -> list[Tensor]:
        sess = self.sessions[name]
        feeds = declared_feeds(sess, {k: v.numpy() for k, v in inputs.items()})
        outs: list[Any] = sess.run(None, feeds)
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    def encode(self, history: Tensor, history_mask: Tensor, context: Tensor) -> Encoded:
        return self.encode_prior(history, history_mask, context)[0]

    def encode_prior(self, history: Tensor, history_mask: Tensor,
                     context: Tensor) -> tuple[Encoded, Tensor | None]:
        m, mm, lo, kv, *mix = self.run("encoder", history=history, history_mask=history_mask,
                                       context=context)
        return (m, mm, lo, kv), (mix[0] if mix else None)

    def step(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
             beam_request: Tensor, prefix: Tensor) -> Tensor:
        return self.step_prior(memory_kv, memory_mask, lower, beam_request, prefix, None)

    def step_prior(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
                   beam_request: Tensor, prefix: Tensor,
                   prior_log_mix: Tensor | None) -> Tensor:
        """A snapshot with prior heads needs ``prior_log_mix`` (the encoder's output)."""
        extra = {PRIOR_LOG_MIX: prior_log_mix} if prior_log_mix is not None else {}
        return self.run("decoder_step", memory_kv=memory_kv, memory_mask=memory_mask,
                        lower=lower, beam_request=beam_request, prefix=prefix, **extra)[0]

    def value(self, memory: Tensor, memory_mask: Tensor, candidates: Tensor,
              memory_kv: Tensor | None = None, context: Tensor | None = None,
              exposure: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """pCTR, pCVR of ``candidates``; ``exposure`` [B, C] zeros when None (read only
        by a snapshot whose value head has the exposure term)."""
        if exposure is None:
            exposure = torch.zeros(candidates.shape[:2], dtype=torch.float32)
        extra = {k: v for k, v in (("memory_kv", memory_kv), ("context", context))
                 if v is not None}
        pctr, pcvr = self.run("value", memory=memory, memory_mask=memory_mask,
                              candidates=candidates, exposure=exposure.float(), **extra)
        return pctr, pcvr


@dataclass
class BeamResult:
    ids: Tensor        # [B, K, T] int64 (-1 rows where fewer than K valid ids exist)
    scores: Tensor     # [B, K] summed log-probability, -inf for missing beams
    rows: Tensor       # [B, K] row of each id in the trie's ``ids`` (-1 if missing)


def beam_widths_for(widths: int | Sequence[int], id_len: int) -> list[int]:
    ws = [int(widths)] * id_len if isinstance(widths, int) else [int(w) for w in widths]
    if len(ws) != id_len or min(ws) < 1:
        raise ValueError(f"need {id_len} beam widths >= 1, got {ws}")
    return ws


@torch.inference_mode()
def beam_search(backend: Backend, history: Tensor, history_mask: Tensor, context: Tensor,
                trie: IdTrie, beam_widths: int | Sequence[int]) -> BeamResult:
    """Constrained beam search for B requests; the encoder runs once per request, each
    step runs the decoder's top blocks over all beams (per-request states are looked
    up by each beam's request, never copied per beam here)."""
    widths = beam_widths_for(beam_widths, trie.id_len)
    mix: Tensor | None = None
    if isinstance(backend, PriorBackend):     # may have prior heads
        (_, mmask, lower, memory_kv), mix = backend.encode_prior(history, history_mask, context)
    else:
        _, mmask, lower, memory_kv = backend.encode(history, history_mask, context)
    B = history.shape[0]
    node = torch.zeros(B, 1, dtype=torch.long)              # [B, k] trie node per beam
    scores = torch.zeros(B, 1)                              # [B, k]
    prefix = torch.zeros(B, 1, 0, dtype=torch.long)         # [B, k, t]
    for t, V in enumerate(trie.level_sizes):
        k = node.shape[1]
        beam_request = torch.arange(B).repeat_interleave(k)  # [B*k]
        logits = backend.step_prior(memory_kv, mmask, lower, beam_request,
                                    prefix.reshape(B * k, t), mix) \
            if isinstance(backend, PriorBackend) else \
            backend.step(memory_kv, mmask, lower, beam_request, prefix.reshape(B * k, t))
        logp = torch.log_softmax(logits[:, :V].float(), dim=-1).reshape(B, k, V)
        child = trie.children[t][node.clamp_min(0)]         # [B, k, V]
        # a dead beam (node -1) has score -inf, so its children are -inf already
        cand = (scores.unsqueeze(-1) + logp).masked_fill(child < 0, -torch.inf)
        width = min(widths[t], k * V)
        scores, flat = cand.reshape(B, k * V).topk(width, dim=-1)    # [B, width]
        src, tok = flat // V, flat % V
        prefix = torch.cat([prefix.gather(1, src.unsqueeze(-1).expand(-1, -1, t)),
                            tok.unsqueeze(-1)], dim=-1)     # [B, width, t+1]
        node = child.reshape(B, k * V).gather(1, flat)
        node = node.masked_fill(scores == -torch.inf, -1)
    ids = torch.where((node >= 0).unsqueeze(-1), prefix, torch.full_like(prefix, -1))
    return BeamResult(ids=ids, scores=scores, rows=node)
