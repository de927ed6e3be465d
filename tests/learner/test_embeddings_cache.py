"""Ad embeddings are encoded once per distinct text per process."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from learner.embeddings import clear_embedding_cache, embed_ads, register_encoder


def test_each_text_is_encoded_once_until_the_cache_is_cleared() -> None:
    seen: list[list[str]] = []

    def encode(texts: Sequence[str]) -> np.ndarray:
        seen.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    register_encoder("counting-test", encode)
    first = embed_ads(["a", "bb", "a"], "counting-test")
    assert seen == [["a", "bb"]]
    assert first.shape == (3, 2) and np.array_equal(first[0], first[2])
    second = embed_ads(["bb", "ccc"], "counting-test")
    assert seen[-1] == ["ccc"] and np.array_equal(second[0], first[1])
    clear_embedding_cache()
    embed_ads(["a"], "counting-test")
    assert seen[-1] == ["a"]
    # registering the name again forgets what the old function encoded
    register_encoder("counting-test", lambda texts: np.ones((len(texts), 2), np.float32))
    assert np.array_equal(embed_ads(["a"], "counting-test"), np.ones((1, 2), np.float32))
