"""The CUDA execution provider path (IO binding); skipped without a usable CUDA device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from tests.server.conftest import AD_IDS, Builder
from tests.support.snapshots import make_ads

pytestmark = pytest.mark.gpu


def test_cuda_provider_serves_the_same_slates_as_cpu(tmp_path: Path,
                                                     snapshots: Builder) -> None:
    cuda = resolve_provider("cuda")
    if cuda.name != "cuda":
        pytest.skip(f"no usable CUDA device: {cuda.reason}")
    snap = snapshots("v1")
    slates = {}
    for provider in (cuda, resolve_provider("cpu")):
        catalog = AdCatalog()
        catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
        mgr = ModelManager(catalog, provider, tmp_path / provider.name, 2)
        assert mgr.apply_update(snap.model_update()) == "ok"     # warm-up + parity on GPU
        (res,) = Engine(mgr, catalog).run([RecRequest("u", {"device": "ios"}, ["ad-0001"], 10)],
                                          lambda levels, k: [10] * levels)
        slates[provider.name] = [(a.ad_id, a.expected_value) for a in res.ads]
    assert [a for a, _ in slates["cuda"]] == [a for a, _ in slates["cpu"]]
    assert np.allclose([v for _, v in slates["cuda"]], [v for _, v in slates["cpu"]], atol=1e-4)
