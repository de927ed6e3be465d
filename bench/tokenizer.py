"""Semantic-ID tokenizer variants on the simulated world's catalogue (ads + organic items).

    python bench/tokenizer.py [--quick] [--encoder minilm] [--seed 0]

The world (traffic/world.py) serves uniformly random slates of its initial ads while
its users consume organic items; that gives the catalogue (the ads and every organic
item consumed) and co-occurrence pairs: two items (organic items consumed or ads
clicked) that follow each other in one user's timeline within an hour. 20 % of the
ads and the last 25 % of the organic items are held out of the fit and placed online
afterwards (nearest codes through the fitted encoder), as new items are.

Organic items are the world's finite catalogue (``organic_per_topic`` per topic, ids
``<topic>#<n>``); their text is the catalogue's title and description
(:func:`traffic.world.organic_text`): a format and one of the topic category's
products, e.g. ``"Unboxing: Wireless earbuds (headphones, retail)"``.

Variants: explicit sizes (64, 32, 16), the demo's, and ``level_sizes="auto"``, each
as plain RQ-KMeans (balanced fit-time ids, the tokenizer before refinement),
``+refine`` (RQ-Kmeans+ refinement) and ``+refine+cooc`` (with the co-occurrence
InfoNCE term on 80 % of the pairs; the other 20 % are held out), the refinement with
balanced or nearest-code assignment (``TokenizerConfig.assignment``). Per
variant, on the fitted catalogue's ids: ``utilisation`` (per level, share of codes
used), ``collision_rate`` (share of items whose full semantic prefix is shared),
``reconstruction_error`` (mean squared residual after the last level over the
latent's mean squared norm), ``reconstruction_error_input`` (decoded codes against
the content embedding), ``cooc_pair_prefix_agreement`` (share of the training pairs
whose level-0 codes agree; ``..._heldout`` for the held-out pairs, ``..._chance`` for
two random fitted items); under ``online`` the same for the items placed online.
Writes bench/results/tokenizer.json and the `## tokenizer` table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.common import (
    RESULTS,
    device,
    markdown_table,
    update_doc_section,
    write_results,
)

DEPENDS = ("learner/__init__.py", "learner/embeddings.py", "learner/tokenizer.py",
           "streams/__init__.py", "streams/features.py", "streams/schemas.py",
           "traffic/__init__.py", "traffic/world.py", "bench/tokenizer.py")

EXPLICIT_SIZES = (64, 32, 16)
WINDOW_S = 3600.0


def organic_text(item_id: str) -> str:
    """Text of a world organic item: its catalogue title and description."""
    from traffic.world import organic_text as world_organic_text

    return world_organic_text(item_id)


def simulate(seed: int, requests: int) -> dict[str, Any]:
    """The world's catalogue and co-occurrence pairs after ``requests`` random slates."""
    from traffic.world import World, WorldConfig

    world = World(WorldConfig(seed=seed, n_users=300, n_ads=200))
    ads = world.initial_ads()
    ad_ids = [a.ad_id for a in ads]
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    organic: list[str] = []
    timeline: dict[str, list[tuple[float, str]]] = {}
    clicks = 0
    for _ in range(requests):
        req = world.next_request()
        events = timeline.setdefault(req.user_id, [])
        for item in req.recent_organic:
            if item not in seen:
                seen.add(item)
                organic.append(item)
                events.append((req.event_time, item))
        slate = [ad_ids[i] for i in rng.choice(len(ad_ids), size=5, replace=False)]
        resp = world.respond(req, slate)
        for out in resp.items:
            if out.clicked:
                clicks += 1
                events.append((req.event_time + 1.0, out.ad_id))
    pairs: list[tuple[str, str]] = []
    for events in timeline.values():
        for (ta, a), (tb, b) in itertools.pairwise(events):
            if a != b and tb - ta <= WINDOW_S:
                pairs.append((a, b))
    return {"ads": ads, "organic": organic, "pairs": pairs, "clicks": clicks}


def level_agreement(tok: Any, pairs: list[tuple[str, str]]) -> float:
    v = tok.prefix_agreement(pairs, 1)
    return round(float(v), 4) if np.isfinite(v) else float("nan")


def chance_agreement(tok: Any) -> float:
    """Level-0 agreement of two random fitted items (sum of squared code shares)."""
    codes = [s[0] for s in [*tok.table().values(), *tok.organic_table().values()]]
    p = np.bincount(codes) / len(codes)
    return round(float((p ** 2).sum()), 4)


def run_variant(name: str, cfg: Any, data: dict[str, Any], emb: dict[str, np.ndarray],
                split: dict[str, Any]) -> dict[str, Any]:
    from learner.tokenizer import OrganicItem, UASIDTokenizer

    fit_ads, fit_org = split["fit_ads"], split["fit_organic"]
    t0 = time.perf_counter()
    tok = UASIDTokenizer.fit(
        fit_ads, cfg, embeddings=np.stack([emb[a.ad_id] for a in fit_ads]),
        organic=[OrganicItem(o, organic_text(o)) for o in fit_org],
        organic_embeddings=np.stack([emb[o] for o in fit_org]),
        cooc=split["train_pairs"] if cfg.cooc_weight > 0 else ())
    fit_s = time.perf_counter() - t0
    rep = tok.report()
    out: dict[str, Any] = {
        "level_sizes": list(tok.config.sizes),
        "utilisation": [round(u, 4) for u in rep["utilisation"]],
        "collision_rate": round(rep["collision_rate"], 4),
        "reconstruction_error": round(rep["reconstruction_error"], 4),
        "reconstruction_error_input": round(rep.get("reconstruction_error_input",
                                                    rep["reconstruction_error"]), 4),
        "collision_rate_before_suffix_ads": round(rep["collision_rate_before_suffix"], 4),
        "cooc_pair_prefix_agreement": level_agreement(tok, split["train_pairs"]),
        "cooc_pair_prefix_agreement_heldout": level_agreement(tok, split["heldout_pairs"]),
        "cooc_pair_prefix_agreement_chance": chance_agreement(tok),
        "codes_reset": rep.get("refine_codes_reset", 0),
        "fit_s": round(fit_s, 2),
    }
    # new items placed online through the fitted encoder (nearest codes)
    new_ads, new_org = split["new_ads"], split["new_organic"]
    for ad in new_ads:
        tok.assign(ad, embedding=emb[ad.ad_id])
    for o in new_org:
        tok.assign_organic(OrganicItem(o, organic_text(o)), embedding=emb[o])
    q = tok.quality(np.stack([emb[a.ad_id] for a in new_ads] + [emb[o] for o in new_org]))
    new_ids = {a.ad_id for a in new_ads} | set(new_org)
    online_pairs = [p for p in data["pairs"] if p[0] in new_ids or p[1] in new_ids]
    out["online"] = {
        "items": len(new_ids),
        "utilisation": [round(u, 4) for u in q["utilisation"]],
        "collision_rate": round(q["collision_rate"], 4),
        "reconstruction_error": round(q["reconstruction_error"], 4),
        "reconstruction_error_input": round(q["reconstruction_error_input"], 4),
        "cooc_pair_prefix_agreement": level_agreement(tok, online_pairs),
        "pairs": len(online_pairs),
    }
    print(f"{name}: {out}", flush=True)
    return out


def write_doc(results: dict[str, Any]) -> None:
    """The `## tokenizer` section of docs/benchmarks.md from the results."""
    variants = results["variants"]

    def lv(xs: list[float]) -> str:
        return "/".join(f"{x:.2f}" for x in xs)

    rows = [[name, "/".join(str(s) for s in v["level_sizes"]), lv(v["utilisation"]),
             v["collision_rate"], v["reconstruction_error"], v["reconstruction_error_input"],
             v["cooc_pair_prefix_agreement"], v["cooc_pair_prefix_agreement_heldout"],
             v["cooc_pair_prefix_agreement_chance"], lv(v["online"]["utilisation"]),
             v["online"]["collision_rate"], v["online"]["reconstruction_error_input"],
             v["online"]["cooc_pair_prefix_agreement"], v["fit_s"]]
            for name, v in variants.items()]
    table = markdown_table(
        ["variant", "sizes", "utilisation", "collision rate", "recon. error (latent)",
         "recon. error (input)", "cooc agreement (train)", "cooc agreement (held-out)",
         "chance", "online utilisation", "online collision rate",
         "online recon. error (input)", "online cooc agreement", "fit s"], rows)
    cat = results["catalogue"]
    head = (f"`bench/tokenizer.py{' --quick' if results['quick'] else ''}`: world seed "
            f"{results['seed']}, {results['requests']} requests with random slates, encoder "
            f"{results['encoder']}, {results['device']}, {results['elapsed_s']:.0f} s. "
            f"Catalogue {cat['ads']} ads + {cat['organic_items']} organic items "
            f"({cat.get('distinct_organic_texts', '?')} distinct organic texts); fit on "
            f"{cat['fit_items']}, the rest placed online; {cat['train_pairs']} co-occurrence "
            f"pairs for training, {cat['heldout_pairs']} held out. Refinement: "
            f"{results['refine_steps']} steps with balanced or nearest-code assignment "
            f"(fit-time ids the same way); cooc weight {results['cooc_weight']}. rq-kmeans "
            "rows: plain RQ-KMeans with balanced ids (refine_steps=0, the default). "
            "Utilisation per level (share of codes used), collision rate = share of items "
            "whose full semantic prefix is shared, reconstruction error = mean squared "
            "residual after the last level over the mean squared norm (latent: the "
            "co-occurrence term changes the latent's norm, so compare the input column "
            "across methods) or decoded codes against the content embedding (input); cooc "
            "agreement = share of co-occurring pairs with the same level-0 code (chance: "
            "two random fitted items). Online columns: the held-out items placed with "
            "nearest codes.")

    def get(name: str) -> dict[str, Any]:
        return dict(variants.get(name, {}))

    notes = []
    for sizes in ("explicit", "auto"):
        base, bal, near = (get(f"rq-kmeans ({sizes})"), get(f"+refine balanced ({sizes})"),
                           get(f"+refine nearest ({sizes})"))
        cooc = get(f"+refine+cooc nearest ({sizes})")
        if base and bal and near and cooc:
            notes.append(
                f"{sizes} sizes: refinement takes the fitted ids' input reconstruction error "
                f"from {base['reconstruction_error_input']:.3g} to "
                f"{near['reconstruction_error_input']:.3g} with nearest codes and to "
                f"{bal['reconstruction_error_input']:.3g} with balanced ones; the "
                f"co-occurrence term moves held-out pair agreement from "
                f"{near['cooc_pair_prefix_agreement_heldout']:.3g} (refine, nearest) to "
                f"{cooc['cooc_pair_prefix_agreement_heldout']:.3g} (chance "
                f"{cooc['cooc_pair_prefix_agreement_chance']:.3g}) at input error "
                f"{cooc['reconstruction_error_input']:.3g}.")
    notes.append("Organic items with the same text share their semantic prefix by design "
                 "(one content, one place in the id space); they dominate the collision "
                 "rate, and the suffix tells them apart.")
    update_doc_section("tokenizer", head + "\n\n" + table + "\n\n" + " ".join(notes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="500 requests and 200 refinement steps (else 1500 and 600)")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--refine-steps", type=int, default=None)
    ap.add_argument("--cooc-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc-only", action="store_true",
                    help="rewrite the docs section from bench/results/tokenizer.json")
    args = ap.parse_args()
    if args.doc_only:
        write_doc(json.loads((RESULTS / "tokenizer.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    requests = args.requests or (500 if args.quick else 1500)
    steps = args.refine_steps or (200 if args.quick else 600)

    from learner.embeddings import ad_text, embed_ads
    from learner.tokenizer import TokenizerConfig

    t0 = time.perf_counter()
    data = simulate(args.seed, requests)
    ads, organic, pairs = data["ads"], data["organic"], data["pairs"]
    texts = [ad_text(a) for a in ads] + [organic_text(o) for o in organic]
    vecs = embed_ads(texts, args.encoder)
    emb = dict(zip([a.ad_id for a in ads] + organic, vecs, strict=True))
    rng = np.random.default_rng(args.seed)
    new_ad_mask = rng.random(len(ads)) < 0.2
    n_fit_org = round(0.75 * len(organic))
    fit_ids = {a.ad_id for a, m in zip(ads, new_ad_mask, strict=True) if not m} \
        | set(organic[:n_fit_org])
    fit_pairs = [p for p in pairs if p[0] in fit_ids and p[1] in fit_ids]
    held = np.random.default_rng(args.seed + 1).random(len(fit_pairs)) < 0.2
    split = {
        "fit_ads": [a for a, m in zip(ads, new_ad_mask, strict=True) if not m],
        "new_ads": [a for a, m in zip(ads, new_ad_mask, strict=True) if m],
        "fit_organic": organic[:n_fit_org], "new_organic": organic[n_fit_org:],
        "train_pairs": [p for p, h in zip(fit_pairs, held, strict=True) if not h],
        "heldout_pairs": [p for p, h in zip(fit_pairs, held, strict=True) if h],
    }
    print(f"catalogue: {len(ads)} ads, {len(organic)} organic items, {len(pairs)} pairs "
          f"({data['clicks']} clicks); fit on {len(fit_ids)} items, "
          f"{len(split['train_pairs'])} training pairs", flush=True)
    base = dict(encoder=args.encoder, seed=args.seed, industry_size=16, goal_size=16,
                advertiser_size=32, suffix_size=32)
    variants: dict[str, Any] = {}
    for sizes_name, sizes in (("explicit", EXPLICIT_SIZES), ("auto", "auto")):
        methods: list[tuple[str, dict[str, Any]]] = [("rq-kmeans", {})]
        for assignment in ("balanced", "nearest"):
            refine = {"refine_steps": steps, "assignment": assignment}
            methods += [(f"+refine {assignment}", refine),
                        (f"+refine+cooc {assignment}", {**refine,
                                                        "cooc_weight": args.cooc_weight})]
        for method, extra in methods:
            name = f"{method} ({sizes_name})"
            cfg = TokenizerConfig(level_sizes=sizes, **base, **extra)
            variants[name] = run_variant(name, cfg, data, emb, split)
    elapsed = time.perf_counter() - t0
    results: dict[str, Any] = {
        "device": device(), "quick": args.quick, "seed": args.seed, "encoder": args.encoder,
        "requests": requests, "refine_steps": steps, "cooc_weight": args.cooc_weight,
        "catalogue": {"ads": len(ads), "organic_items": len(organic), "pairs": len(pairs),
                      "distinct_organic_texts": len({organic_text(o) for o in organic}),
                      "clicks": data["clicks"], "fit_items": len(fit_ids),
                      "train_pairs": len(split["train_pairs"]),
                      "heldout_pairs": len(split["heldout_pairs"])},
        "variants": variants, "elapsed_s": round(elapsed, 1),
    }
    write_results("tokenizer", results, DEPENDS)
    write_doc(results)
    print(f"done in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
