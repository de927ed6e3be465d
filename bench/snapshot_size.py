"""Snapshot size of a default export, by catalogue size (input to docs/scale.md).

    python bench/snapshot_size.py [--ads 5000,20000]

For each catalogue size: synthetic ads, ``adloop pretrain``'s default model config
(3×256 semantic levels + business tokens, D=64, LazyAR; the ``hashing`` ad encoder, which
changes the tokenizer's input, not the model's size) trained for 2 steps, then
``export_run`` (ONNX + manifest with parity outputs). Records every file's bytes and the
manifest's parts: the model files do not grow with the catalogue, the manifest's ``ids``
table does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results

DEPENDS = ("learner/", "snapshot_format/", "streams/__init__.py", "streams/features.py",
           "streams/logs.py", "streams/metrics.py", "streams/schemas.py", "streams/settings.py",
           "streams/topics.py", "bench/snapshot_size.py")


def measure(n_ads: int, root: Path) -> dict[str, Any]:
    from learner import synthetic
    from learner.export import export_run
    from learner.pretrain import PretrainSettings, pretrain

    log = synthetic.generate(n_ads=n_ads, n_users=200, n_requests=600, n_categories=8, seed=1)
    res = pretrain(PretrainSettings(run_dir=root / "pre", encoder="hashing", steps=2,
                                    progress=False, checkpoint_every=0, threads=1,
                                    resume=False), log.ads, log.feedback)
    t0 = time.perf_counter()
    export_run(root / "pre", root / "snap", "v000001")
    export_s = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted((root / "snap").iterdir())}
    manifest = json.loads((root / "snap" / "manifest.json").read_text())
    parts = {k: len(json.dumps(v, separators=(",", ":"))) for k, v in manifest.items()}
    return {"n_ads": n_ads, "model_params": res.model.num_parameters(),
            "level_sizes": manifest["level_sizes"], "d_model": manifest["d_model"],
            "files_bytes": files, "total_bytes": sum(files.values()),
            "manifest_ids_bytes": parts["ids"], "manifest_parity_bytes": parts["parity"],
            "export_s": round(export_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ads", default="5000,20000")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.ads.split(",")):
        with tempfile.TemporaryDirectory(prefix="adloop-snapsize-") as tmp:
            rows.append(measure(n, Path(tmp)))
    results: dict[str, Any] = {"by_ads": rows}
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        results["bytes_per_ad"] = round((b["total_bytes"] - a["total_bytes"])
                                        / (b["n_ads"] - a["n_ads"]), 1)
        results["fixed_bytes"] = round(a["total_bytes"] - results["bytes_per_ad"] * a["n_ads"])
    path = write_results("snapshot_size", results, DEPENDS)
    print(path.read_text())


if __name__ == "__main__":
    main()
