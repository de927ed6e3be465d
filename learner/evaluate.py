"""Offline evaluation: recall@K and value-weighted NDCG@K of constrained beam search.

Per held-out request, the relevant set is its positive items (clicked or converted)
with gain = realized value (the example's ``value``). The beam search's final beam,
ranked by log-probability, is the ranking:

    recall@K = |relevant ∩ top-K| / |relevant|
    vNDCG@K  = Σ_{i<K, beam i relevant} gain_i / log2(i + 2)  /  IDCG@K

both averaged over requests with at least one positive.

Beyond accuracy (:mod:`learner.beyond`), of the top-K list (K the largest of ``--k``)
of those requests: catalogue coverage (of the ads with an id), SID diversity (share of
a list's ad pairs with different semantic-ID level-0 codes), novelty unseen (share of
listed ads the user had not been shown in the log up to that request), novelty in bits
(against the clicks of the log before the evaluated part) and personalization (1 - mean
Jaccard overlap of two users' lists); ``beyond_k`` is that K. A figure without a
value (one user only, say) is left out.

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
from learner.beyond import beyond_accuracy, click_bits, novelty_unseen
from learner.data import ExampleSet, build_examples, latest_feedback, read_jsonl, split_by_time
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
             batch_size: int = 64,
             served: dict[int, list[int]] | None = None) -> dict[str, float]:
    """Recall@K and value-weighted NDCG@K for every K in ``ks`` (K ≤ final beam).
    ``served``, when given, receives each evaluated request's top-K trie rows (K the
    largest of ``ks``), by request index."""
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
            if served is not None:
                served[r] = ranked[:max(ks)]
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


def beyond_of_lists(records: Sequence[Feedback], served: dict[int, list[int]],
                    ad_of_row: Sequence[str], id_rows: Sequence[Sequence[int]],
                    seed: int = 0) -> dict[str, float]:
    """Beyond-accuracy metrics of the lists ``served`` (request index into ``records``,
    :func:`learner.data.latest_feedback` order -> trie rows), see the module docstring.
    The history of a user is what the log showed them before; requests of the evaluated
    part without a list still add what they showed."""
    if not served:
        return {}
    first = min(served)
    order = sorted(served)
    users = [records[r].user_id for r in order]
    lists = [[ad_of_row[x] for x in served[r]] for r in order]
    prior: dict[str, set[str]] = {}
    for rec in records[:first]:
        prior.setdefault(rec.user_id, set()).update(it.ad_id for it in rec.items)
    prefix = {a: int(row[0]) for a, row in zip(ad_of_row, id_rows, strict=True)}
    out = beyond_accuracy(users, lists, servable=len(ad_of_row), prefix_of=prefix.__getitem__,
                          bits=click_bits(records[:first]), seed=seed)
    stream = records[first:]
    out["novelty_unseen"] = novelty_unseen(
        [rec.user_id for rec in stream],
        [[ad_of_row[x] for x in served.get(first + i, [])] for i in range(len(stream))],
        seen=[[it.ad_id for it in rec.items] for rec in stream], prior=prior)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, EvaluateSettings)


def run(args: argparse.Namespace) -> int:
    from learner.checkpoint import load_model

    s = settings_from_args(EvaluateSettings, args)
    if s.feedback is None:
        raise SystemExit("adloop evaluate: --feedback FILE is required")
    model, tok, _ = load_model(s.run_dir)
    feedback = read_jsonl(s.feedback, Feedback)
    ex = build_examples(feedback, tok, model.cfg.history_len,
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
    served: dict[int, list[int]] = {}
    metrics = evaluate(backend, test, trie, s.beam_width, ks, served=served)
    ad_ids, id_rows = tok.id_array()
    metrics.update(beyond_of_lists(latest_feedback(feedback), served, ad_ids,
                                   id_rows.tolist()))
    metrics["beyond_k"] = float(max(ks))
    log.info("evaluated", **metrics)
    text = json.dumps(metrics, indent=1, sort_keys=True)
    print(text)
    if s.out is not None:
        Path(s.out).write_text(text + "\n")
    return 0
