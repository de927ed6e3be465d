"""Offline evaluation: recall@K and value-weighted NDCG@K of constrained beam search.

Per held-out request, the relevant set is its positive items (clicked or converted)
with gain = realized value (the example's ``value``). The beam search's final beam,
ranked by log-probability, is the ranking:

    recall@K = |relevant ∩ top-K| / |relevant|
    vNDCG@K  = Σ_{i<K, beam i relevant} gain_i / log2(i + 2)  /  IDCG@K

both averaged over requests with at least one positive.

CLI: ``adloop evaluate --run-dir RUN --feedback FEEDBACK.jsonl`` (held-out split by
time, as in pretraining) or ``--backend onnx --snapshot DIR`` for an exported snapshot.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic_settings import BaseSettings, SettingsConfigDict

from learner.beam import Backend, IdTrie, OrtBackend, TorchBackend, beam_search
from learner.data import ExampleSet, build_examples, read_jsonl, split_by_time
from learner.tokenizer import UASIDTokenizer
from streams.logs import get_logger
from streams.schemas import Feedback
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)


def trie_of(tok: UASIDTokenizer) -> tuple[IdTrie, dict[tuple[int, ...], int]]:
    """The trie of every id in the tokenizer and id -> trie row."""
    _, arr = tok.id_array()
    return IdTrie(arr, tok.config.token_sizes), {tuple(r): i for i, r in enumerate(arr.tolist())}


def evaluate(backend: Backend, examples: ExampleSet, trie: IdTrie,
             beam_widths: int | Sequence[int], ks: Sequence[int] = (10,),
             batch_size: int = 64) -> dict[str, float]:
    """Recall@K and value-weighted NDCG@K for every K in ``ks`` (K ≤ final beam)."""
    row_of = {tuple(r): i for i, r in enumerate(trie.ids.tolist())}
    requests: dict[int, list[int]] = {}
    for i in examples.positives:
        requests.setdefault(int(examples.request[i]), []).append(int(i))
    reqs = sorted(requests)
    recall = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    t0 = time.perf_counter()
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s: s + batch_size]
        first = [requests[r][0] for r in chunk]
        b = examples.batch(first)
        res = beam_search(backend, b.history, b.history_mask, b.context, trie, beam_widths)
        rows = res.rows.numpy()
        for j, r in enumerate(chunk):
            gains: dict[int, float] = {}
            for i in requests[r]:
                row = row_of.get(tuple(examples.target[i].tolist()))
                if row is not None:
                    gains[row] = max(gains.get(row, 0.0), float(examples.value[i]))
            n_rel = len(requests[r])
            ranked = [int(x) for x in rows[j] if x >= 0]
            ideal = sorted(gains.values(), reverse=True)
            for k in ks:
                top = ranked[:k]
                recall[k] += sum(1 for x in top if x in gains) / n_rel
                dcg = sum(gains[x] / math.log2(i + 2) for i, x in enumerate(top) if x in gains)
                idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
                ndcg[k] += dcg / idcg if idcg > 0 else 0.0
    n = max(len(reqs), 1)
    out = {f"recall@{k}": recall[k] / n for k in ks}
    out.update({f"vndcg@{k}": ndcg[k] / n for k in ks})
    out["requests"] = float(len(reqs))
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------
# CLI


class EvaluateSettings(BaseSettings):
    """``adloop evaluate`` settings (env ADLOOP_EVALUATE_<NAME>)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_EVALUATE_", extra="ignore")

    run_dir: Path = Path("runs/pretrain")
    """Pretraining run (checkpoint.pt + tokenizer/)."""
    feedback: Path | None = None
    """JSONL of Feedback records; the held-out split is evaluated."""
    held_out_frac: float = 0.1
    all_data: bool = False
    """Evaluate every request instead of the held-out split."""
    backend: str = "torch"
    """torch (the checkpoint) or onnx (the snapshot in --snapshot)."""
    snapshot: Path | None = None
    beam_width: int = 32
    k: str = "10"
    """Comma-separated K values."""
    out: Path | None = None
    """Write the metrics as JSON here too."""


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, EvaluateSettings)


def run(args: argparse.Namespace) -> int:
    from learner.checkpoint import load_model

    s = settings_from_args(EvaluateSettings, args)
    if s.feedback is None:
        raise SystemExit("adloop evaluate: --feedback FILE is required")
    model, tok, _ = load_model(s.run_dir)
    ex = build_examples(read_jsonl(s.feedback, Feedback), tok, model.cfg.history_len,
                        model.cfg.context_features, model.cfg.context_buckets,
                        model.cfg.mtp_heads, on_unknown="skip",
                        organic_len=model.cfg.organic_len)
    test = ex if s.all_data else split_by_time(ex, s.held_out_frac)[1]
    backend: Backend
    if s.backend == "onnx":
        if s.snapshot is None:
            raise SystemExit("adloop evaluate: --backend onnx needs --snapshot DIR")
        from learner.export import verify_snapshot

        manifest = verify_snapshot(s.snapshot)
        tok.check_version(manifest["id_space_version"], what=f"snapshot {s.snapshot}")
        backend = OrtBackend(s.snapshot)
    elif s.backend == "torch":
        backend = TorchBackend(model)
    else:
        raise SystemExit(f"adloop evaluate: unknown backend {s.backend!r} (torch or onnx)")
    trie, _ = trie_of(tok)
    torch.manual_seed(0)
    ks = [int(k) for k in s.k.split(",") if k.strip()]
    metrics = evaluate(backend, test, trie, s.beam_width, ks)
    log.info("evaluated", **metrics)
    text = json.dumps(metrics, indent=1, sort_keys=True)
    print(text)
    if s.out is not None:
        Path(s.out).write_text(text + "\n")
    return 0
