"""The serving worker: onnxruntime sessions, trie-constrained beam search with dynamic
beam width, batching, HTTP API, snapshot hot swap and impression logging.

Nothing in this package imports torch; see ``server/README.md``.
"""
