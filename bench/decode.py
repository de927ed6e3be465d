"""Decode benchmark: LazyAR vs full AR, and ONNX Runtime vs torch eager.

    python bench/decode.py --quick

1. Generates a synthetic log (learner.synthetic), fits UA-SID, pretrains two models
   with identical settings except the decoder mode (lazy_ar, full_ar).
2. Recall@K / vNDCG@K of trie-constrained beam search on held-out requests, same beams.
3. Decode latency (encoder + every beam-search step) per batch for several beam
   widths, both modes, torch eager; lazyar_speedup = full-AR latency / LazyAR latency
   at the headline beam width.
4. Exports the LazyAR model, runs the whole beam search with ONNX Runtime sessions
   (CPU provider) and with the torch modules on the same requests, checks the beams
   are identical, and reports throughput (requests/s) of both.
5. The server's own search on that snapshot with and without skipping the decoder for
   beams that have a single allowed child (``server_skip_forced_speedup``).
6. The cost of GPR's intent decoder (``intent_tokens`` = 4): the LazyAR model's weights
   plus an (untrained) intent decoder, per-request encoder and whole-search latency
   with and without it (``intent_decoder``; latency only, the beams differ).

Writes bench/results/decode.json and the ``## decode`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402
from learner import synthetic  # noqa: E402
from learner.beam import (  # noqa: E402
    Backend,
    Encoded,
    IdTrie,
    OrtBackend,
    TorchBackend,
    beam_search,
)
from learner.data import Batch  # noqa: E402
from learner.evaluate import trie_of  # noqa: E402
from learner.export import export_snapshot  # noqa: E402
from learner.model import GenerativeRecommender, ModelConfig  # noqa: E402
from learner.pretrain import PretrainSettings, pretrain  # noqa: E402
from server.controller import scale_widths  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

DEPENDS = ("learner/", "server/", "snapshot_format/", "streams/__init__.py",
           "streams/features.py", "streams/logs.py", "streams/metrics.py", "streams/schemas.py",
           "streams/settings.py", "streams/topics.py", "bench/decode.py")


def device_name() -> str:
    """Where the benchmark ran: it runs torch and ONNX Runtime on the CPU."""
    model = platform.processor() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(1).strip()
    except OSError:
        pass
    return f"cpu {model}"


def time_interleaved(backends: Mapping[str, Backend], batches: list[Batch], trie: IdTrie,
                     widths: int | list[int], repeats: int) -> dict[str, float]:
    """Median seconds per beam search over ``batches`` for each backend, measured in
    alternation (so load from other processes hits every backend alike)."""
    for be in backends.values():  # warm-up
        b = batches[0]
        beam_search(be, b.history, b.history_mask, b.context, trie, widths)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for b in batches:
            for name, be in backends.items():
                t0 = time.perf_counter()
                beam_search(be, b.history, b.history_mask, b.context, trie, widths)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class _FixedLogits:
    """A backend whose step returns fixed logits: times the search loop alone."""

    def __init__(self, backend: Backend, b: Batch, vocab: int) -> None:
        self.states = backend.encode(b.history, b.history_mask, b.context)
        self.vocab = vocab
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def encode(self, history: torch.Tensor, history_mask: torch.Tensor,
               context: torch.Tensor) -> Encoded:
        return self.states

    def step(self, memory_kv: torch.Tensor, memory_mask: torch.Tensor, lower: torch.Tensor,
             beam_request: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        key = (beam_request.shape[0], prefix.shape[1])
        if key not in self.logits:
            self.logits[key] = torch.randn(beam_request.shape[0], self.vocab)
        return self.logits[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a couple of minutes")
    ap.add_argument("--encoder", default="minilm", help="content encoder for UA-SID")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-top", type=int, default=1, help="LazyAR: decoder blocks (M of N=4) "
                    "that take the generated token")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for torch and ONNX Runtime alike (default 1: on a "
                    "shared 2-core machine more threads mostly measure contention)")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    n_ads, n_req, steps = (400, 6000, 500) if a.quick else (1500, 20000, 2000)
    log = synthetic.generate(n_ads=n_ads, n_users=n_ads // 2, n_requests=n_req,
                             n_categories=12, seed=a.seed)
    k, eval_beam = 10, 32
    bench_widths = [16, 64, 128]
    headline = 64
    batch_rows = 8
    repeats = 5 if a.quick else 15
    work = Path(tempfile.mkdtemp(prefix="adloop-bench-"))
    common = dict(encoder=a.encoder, level_sizes="32,16,8", industry_size=16, goal_size=8,
                  advertiser_size=16, suffix_size=16, d_model=64, n_head=4, n_enc_layer=2,
                  n_layer=4, n_top=a.n_top, steps=steps, batch_size=64, lr=3e-3, seed=a.seed,
                  eval_beam_width=eval_beam, eval_k=k, progress=False, checkpoint_every=0,
                  threads=a.threads)
    results: dict[str, dict] = {}
    runs = {}
    for mode in ("lazy_ar", "full_ar"):
        t0 = time.perf_counter()
        s = PretrainSettings(run_dir=work / mode, mode=mode, **common)
        runs[mode] = pretrain(s, log.ads, log.feedback)
        results[mode] = {"train_seconds": time.perf_counter() - t0, **runs[mode].metrics}
        print(f"{mode}: trained in {results[mode]['train_seconds']:.1f}s, "
              f"recall@{k}={runs[mode].metrics.get(f'recall@{k}', 0):.4f}", flush=True)

    tok = runs["lazy_ar"].tokenizer
    trie, _ = trie_of(tok)
    from learner.data import build_examples, split_by_time

    ex = build_examples(log.feedback, tok)
    _, test = split_by_time(ex, 0.1)
    batch = test.batch(test.positives[:batch_rows])

    latency: dict[str, dict[int, float]] = {"lazy_ar": {}, "full_ar": {}}
    modes = {m: TorchBackend(runs[m].model) for m in latency}
    for w in bench_widths:
        med = time_interleaved(modes, [batch], trie, w, repeats)
        for m in latency:
            latency[m][w] = med[m]
        print(f"beam {w}: lazy {med['lazy_ar'] * 1e3:.2f} ms, full {med['full_ar'] * 1e3:.2f} ms"
              f" / batch of {batch_rows}", flush=True)
    speedup = {w: latency["full_ar"][w] / latency["lazy_ar"][w] for w in bench_widths}

    # ONNX Runtime vs torch eager on the whole beam search (LazyAR model)
    t0 = time.perf_counter()
    manifest = export_snapshot(runs["lazy_ar"].model, tok, work / "snapshot", "bench")
    export_seconds = time.perf_counter() - t0
    ort_b = OrtBackend(work / "snapshot", threads=a.threads)
    torch_b = TorchBackend(runs["lazy_ar"].model)
    rt: dict[str, Backend] = {"torch": torch_b, "ort": ort_b}
    parity = manifest["metrics"]["parity_max_abs_diff"]
    same = True
    single = [test.batch([i]) for i in test.positives[: (10 if a.quick else 50)]]
    med = time_interleaved(rt, single, trie, headline, 3)
    tput = {name: 1.0 / v for name, v in med.items()}
    for b in single:
        r_t = beam_search(torch_b, b.history, b.history_mask, b.context, trie, headline)
        r_o = beam_search(ort_b, b.history, b.history_mask, b.context, trie, headline)
        same &= bool(torch.equal(r_t.rows, r_o.rows))
        finite = torch.isfinite(r_t.scores)
        parity = max(parity, float((r_t.scores[finite] - r_o.scores[finite]).abs().max()))
    # batched throughput too (the server batches requests)
    med = time_interleaved(rt, [batch], trie, headline, repeats)
    tput_batched = {name: batch_rows / v for name, v in med.items()}
    ort_vs_torch = tput["ort"] / tput["torch"]
    # the same at the server's default beam schedule (what `adloop serve` runs at alpha 1)
    serve_widths = scale_widths(ServerSettings().schedule(), 1.0, tok.config.id_len)
    med = time_interleaved(rt, single, trie, serve_widths, 3)
    tput_serve = {name: 1.0 / v for name, v in med.items()}
    med = time_interleaved(rt, [batch], trie, serve_widths, repeats)
    tput_serve_batched = {name: batch_rows / v for name, v in med.items()}
    # the search loop's own cost (log-softmax, trie lookup, top-k, prefix update; the
    # same code for both runtimes), measured with a step that returns fixed logits
    fixed = {"loop": _FixedLogits(torch_b, single[0], max(trie.level_sizes))}
    loop_ms = {name: 1e3 * time_interleaved(fixed, [single[0]], trie, w, 20)["loop"]
               for name, w in ((str(headline), headline), ("serving", serve_widths))}
    server_ms = server_search_ms(work / "snapshot", batch, serve_widths, a.threads, repeats)
    intent = intent_cost(runs["lazy_ar"].model, batch, trie, headline, repeats)
    recall_lazy = results["lazy_ar"].get(f"recall@{k}", 0.0)
    recall_full = results["full_ar"].get(f"recall@{k}", 0.0)
    out = {
        "lazyar_speedup": speedup[headline],
        "lazyar_speedup_by_beam": {str(w): v for w, v in speedup.items()},
        "decode_latency_ms": {m: {str(w): v * 1e3 for w, v in d.items()}
                              for m, d in latency.items()},
        "decode_batch_requests": batch_rows,
        "headline_beam_width": headline,
        "recall_lazyar": recall_lazy,
        "recall_full_ar": recall_full,
        "recall_k": k,
        "recall_beam_width": eval_beam,
        "vndcg_lazyar": results["lazy_ar"].get(f"vndcg@{k}", 0.0),
        "vndcg_full_ar": results["full_ar"].get(f"vndcg@{k}", 0.0),
        "recall_chance": k / len(tok),
        "ort_vs_torch_throughput": ort_vs_torch,
        "ort_vs_torch_throughput_batched": tput_batched["ort"] / tput_batched["torch"],
        "throughput_requests_per_s": {"torch": tput["torch"], "ort": tput["ort"],
                                      "torch_batched": tput_batched["torch"],
                                      "ort_batched": tput_batched["ort"]},
        "serving_beam_widths": serve_widths,
        "ort_vs_torch_throughput_serving_widths": tput_serve["ort"] / tput_serve["torch"],
        "ort_vs_torch_throughput_serving_widths_batched":
            tput_serve_batched["ort"] / tput_serve_batched["torch"],
        "throughput_requests_per_s_serving_widths": {
            "torch": tput_serve["torch"], "ort": tput_serve["ort"],
            "torch_batched": tput_serve_batched["torch"],
            "ort_batched": tput_serve_batched["ort"]},
        "search_loop_ms_one_request": loop_ms,
        "server_search_ms_per_request": server_ms,
        "server_skip_forced_speedup": server_ms["every_beam"] / server_ms["skip_forced"],
        "ort_beams_identical": same,
        "parity_max_abs_diff": parity,
        "intent_decoder": intent,
        "export_seconds": export_seconds,
        "train_seconds": {m: results[m]["train_seconds"] for m in results},
        "ads": len(tok), "id_len": tok.config.id_len, "d_model": 64, "n_layer": 4, "n_top": a.n_top,
        "inject_mlp": runs["lazy_ar"].model.cfg.inject_mlp,
        "train_steps": steps, "encoder": a.encoder, "quick": a.quick, "threads": a.threads,
        "device": device_name(),
        "targets": {"lazyar_speedup": ">= 2", "recall_gap": "<= 0.02 absolute",
                    "ort_vs_torch_throughput": ">= 3"},
        "targets_met": {"lazyar_speedup": speedup[headline] >= 2.0,
                        "recall_gap": abs(recall_lazy - recall_full) <= 0.02,
                        "ort_vs_torch_throughput": ort_vs_torch >= 3.0},
    }
    write_results("decode", out, DEPENDS, path=Path(a.out))
    write_docs(Path(a.docs), out, bench_widths)
    print(json.dumps({k2: out[k2] for k2 in ("lazyar_speedup", "recall_lazyar",
                                             "recall_full_ar", "ort_vs_torch_throughput",
                                             "parity_max_abs_diff", "device")}, indent=1))
    return 0


def intent_cost(model: GenerativeRecommender, batch: Batch, trie: IdTrie, width: int,
                repeats: int, tokens: int = 4) -> dict[str, Any]:
    """Per-request latency (ms) of the encoder and of the whole beam search at ``width``,
    torch eager, without and with an intent decoder of ``tokens`` queries added to
    ``model``'s weights: what the intents cost once per request, and what their extra
    memory rows cost the decoding steps."""
    cfg = ModelConfig.from_json({**model.cfg.to_json(), "intent_tokens": tokens})
    with_intents = GenerativeRecommender(cfg)
    with_intents.load_state_dict(model.state_dict(), strict=False)
    backends: dict[str, Backend] = {"off": TorchBackend(model),
                                    "on": TorchBackend(with_intents)}
    B = batch.history.shape[0]
    encode: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats * 4):
        for name, be in backends.items():
            t0 = time.perf_counter()
            be.encode(batch.history, batch.history_mask, batch.context)
            encode[name].append(time.perf_counter() - t0)
    search = time_interleaved(backends, [batch], trie, width, repeats)
    return {"tokens": tokens, "layers": cfg.n_intent_layer, "beam_width": width,
            "encode_ms_per_request": {n: 1e3 * statistics.median(t) / B
                                      for n, t in encode.items()},
            "search_ms_per_request": {n: 1e3 * v / B for n, v in search.items()},
            "search_overhead": search["on"] / search["off"]}


def server_search_ms(snapshot: Path, batch: Batch, widths: list[int], threads: int,
                     repeats: int) -> dict[str, float]:
    """The server's own search on the exported snapshot (ONNX Runtime, numpy beam search
    over its trie of every id), ms per request of the batch, with the decoder run only
    for beams that have a choice (``skip_forced``, what ``adloop serve`` does) and for
    every beam at every level; the beams are checked identical."""
    import numpy as np

    from server.beam import beam_search as server_beam_search
    from server.runtime import ModelRuntime, resolve_provider
    from server.trie import build_trie, sort_ids
    from snapshot_format import parse_manifest

    man = parse_manifest((snapshot / "manifest.json").read_bytes())
    rt = ModelRuntime(snapshot, resolve_provider("cpu"), threads)
    trie = build_trie(man.ids, sort_ids(man.ids), np.ones(len(man.ad_ids), bool),
                      man.level_sizes)
    B = batch.history.shape[0]
    states = rt.encode(batch.history.numpy(), batch.history_mask.numpy(),
                       batch.context.numpy())

    def step(req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        return rt.step(states, req, prefix)

    out: dict[str, float] = {}
    beams = {}
    for name, skip in (("skip_forced", True), ("every_beam", False)) * 2:   # warm, then time
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            beams[name] = server_beam_search(step, trie, B, widths, skip_forced=skip)
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times) / B
    a, b = beams["skip_forced"], beams["every_beam"]
    assert np.array_equal(a.rows, b.rows) and np.allclose(a.logprob, b.logprob), \
        "skipping forced levels changed the beams"
    return out


def write_docs(path: Path, r: dict, widths: list[int]) -> None:
    lat = r["decode_latency_ms"]
    met = r["targets_met"]
    lines = [
        "## decode",
        "",
        f"`python bench/decode.py{' --quick' if r['quick'] else ''}` on {r['device']}, "
        f"{r['threads']} intra-op thread(s) for torch and ONNX Runtime; "
        f"{r['ads']} synthetic ads, id length {r['id_len']}, d_model {r['d_model']}, "
        f"N={r['n_layer']} decoder blocks, LazyAR top M={r['n_top']}, prefix injection "
        f"MLP {'on' if r['inject_mlp'] else 'off'}, "
        f"{r['train_steps']} pretraining steps per model, content encoder `{r['encoder']}`. "
        "Raw numbers: `bench/results/decode.json`.",
        "",
        "| beam width | LazyAR ms / batch | full AR ms / batch | speedup |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for w in widths:
        lines.append(f"| {w} | {lat['lazy_ar'][str(w)]:.2f} | {lat['full_ar'][str(w)]:.2f} | "
                     f"{r['lazyar_speedup_by_beam'][str(w)]:.2f}x |")
    tp = r["throughput_requests_per_s"]
    ts = r["throughput_requests_per_s_serving_widths"]
    loop = r["search_loop_ms_one_request"]
    lines += [
        "",
        f"Latency is the whole trie-constrained beam search (encoder + {r['id_len']} steps) "
        f"for a batch of {r['decode_batch_requests']} requests, torch eager, median. Both "
        "modes run the same code: the encoder (and, for LazyAR, the lower blocks and the "
        "top blocks' memory keys/values) once per request, then per step the token-taking "
        "blocks over the beams, only the last position's output computed in the last block.",
        "",
        "| metric | LazyAR | full AR | target | met |",
        "| --- | ---: | ---: | --- | --- |",
        f"| recall@{r['recall_k']} (beam {r['recall_beam_width']}) | {r['recall_lazyar']:.4f} | "
        f"{r['recall_full_ar']:.4f} | within 0.02 | {'yes' if met['recall_gap'] else 'NO'} |",
        f"| vNDCG@{r['recall_k']} | {r['vndcg_lazyar']:.4f} | {r['vndcg_full_ar']:.4f} | | |",
        f"| decode speedup at beam {r['headline_beam_width']} | "
        f"{r['lazyar_speedup']:.2f}x | 1x | >= 2x | {'yes' if met['lazyar_speedup'] else 'NO'} |",
        "",
        f"Chance recall@{r['recall_k']} is {r['recall_chance']:.4f}.",
        "",
        "| runtime (LazyAR, beam " + str(r["headline_beam_width"]) + ") | requests/s, one at a "
        "time | requests/s, batch of " + str(r["decode_batch_requests"]) + " |",
        "| --- | ---: | ---: |",
        f"| torch eager | {tp['torch']:.1f} | {tp['torch_batched']:.1f} |",
        f"| ONNX Runtime (CPU EP) | {tp['ort']:.1f} | {tp['ort_batched']:.1f} |",
        f"| ratio | {r['ort_vs_torch_throughput']:.2f}x | "
        f"{r['ort_vs_torch_throughput_batched']:.2f}x |",
        "",
        "At the server's default beam schedule ("
        + ",".join(str(w) for w in r["serving_beam_widths"]) + ", `adloop serve` at full "
        "width):",
        "",
        "| runtime (LazyAR, serving widths) | requests/s, one at a time | requests/s, batch of "
        + str(r["decode_batch_requests"]) + " |",
        "| --- | ---: | ---: |",
        f"| torch eager | {ts['torch']:.1f} | {ts['torch_batched']:.1f} |",
        f"| ONNX Runtime (CPU EP) | {ts['ort']:.1f} | {ts['ort_batched']:.1f} |",
        f"| ratio | {r['ort_vs_torch_throughput_serving_widths']:.2f}x | "
        f"{r['ort_vs_torch_throughput_serving_widths_batched']:.2f}x |",
        "",
        "The search loop alone (log-softmax, trie lookup, top-k and prefix update between "
        "steps, the same code for both runtimes, timed with a step that returns fixed "
        f"logits) costs {loop['serving']:.2f} ms per request at the serving widths and "
        f"{loop[str(r['headline_beam_width'])]:.2f} ms at beam {r['headline_beam_width']}.",
        "",
        "The server's own search (`server/beam.py` over ONNX Runtime, the batch of "
        f"{r['decode_batch_requests']}, serving widths) runs the decoder only for beams with "
        "more than one allowed child: "
        f"{r['server_search_ms_per_request']['skip_forced']:.2f} ms per request, against "
        f"{r['server_search_ms_per_request']['every_beam']:.2f} ms calling it for every "
        f"beam at every level ({r['server_skip_forced_speedup']:.2f}x; same beams and "
        "scores, checked).",
        "",
        "ONNX Runtime returns the same beams as torch: "
        f"{'yes' if r['ort_beams_identical'] else 'NO'}; "
        f"max |ORT - torch| over parity tensors and beam scores: {r['parity_max_abs_diff']:.2e}; "
        f"target ORT >= 3x torch eager (one request at a time): "
        f"{'met' if met['ort_vs_torch_throughput'] else 'NOT met'}. "
        f"Export of the three graphs + manifest took {r['export_seconds']:.2f}s.",
        "",
        f"GPR's intent decoder ({r['intent_decoder']['tokens']} intents, "
        f"{r['intent_decoder']['layers']} block, torch eager, beam "
        f"{r['intent_decoder']['beam_width']}, batch of {r['decode_batch_requests']}) runs "
        "once per request in the encoder: encoder "
        f"{r['intent_decoder']['encode_ms_per_request']['off']:.3f} -> "
        f"{r['intent_decoder']['encode_ms_per_request']['on']:.3f} ms per request, whole "
        f"search {r['intent_decoder']['search_ms_per_request']['off']:.2f} -> "
        f"{r['intent_decoder']['search_ms_per_request']['on']:.2f} ms per request "
        f"({r['intent_decoder']['search_overhead']:.2f}x; the steps only see "
        f"{r['intent_decoder']['tokens']} more memory rows).",
        "",
    ]
    if not met["recall_gap"]:
        lines += [
            f"Recall gap not met in this run: with M={r['n_top']} of N={r['n_layer']} blocks "
            "taking the generated prefix, LazyAR learns p(c_t | c_<t) with fewer token-aware "
            "layers than full AR. At this size the gap also moves by several points from one "
            "seed to another (`--seed`).",
            "",
        ]
    if not met["ort_vs_torch_throughput"]:
        lines += [
            "ORT target not met in this run. Both runtimes run the same graphs (format 2: "
            "memory keys/values once per request, a step is only the top blocks over the "
            "beam rows) inside the same beam-search loop, at equal outputs. ONNX Runtime "
            "wins most on the encoder (about 4x: many small kernels, where its lower "
            "per-op cost is the whole difference) and least on the decoder step, whose "
            "time is matrix products that both runtimes run on equally fast CPU kernels "
            "(the prefix-injection MLP and the self-attention keys/values over every "
            "prefix position of every beam: ORT's profiler puts those GEMMs at half of a "
            "step at beam 64). The search loop between steps costs both the same. So the "
            "ratio falls as beams and batches grow: highest at one request at the serving "
            "widths, lowest batched at beam 64. An experiment that computed only the newest "
            "position per step (the work a per-beam key/value cache would leave) moved the "
            "one-request ratio at beam 64 only from about 2.1x to 2.3x: both runtimes save "
            "the same GEMM work.",
            "",
        ]
    section = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## decode\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
