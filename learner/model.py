"""The generative recommender: user encoder, LazyAR decoder, value / MTP / prior heads.

Read top to bottom (nanoGPT-style: one small module per idea). Notation:
B requests, K beams or candidates, N = B·K rows, H history length, C context
features, S = C + H memory length, T id length (semantic levels + business tokens +
suffix), P tokens already chosen, D model width, V = max vocabulary over positions.

* ``UserEncoder``: the user's recent ad ids (each id = sum of its token embeddings)
  and hashed context features -> ``memory`` [B, S, D].
* Cross-attention keys/values of the memory depend only on the request, so the
  blocks that run per beam or per candidate (the decoder's top blocks) take them
  precomputed once per request: ``memory_kv`` [B, M, 2, h, S, D/h] (keys, values by
  head for each of the M token-taking blocks). Rows that share a request attend to its
  keys either grouped (``N = B·G`` request-major rows: a free reshape of the queries)
  or through ``rows`` [N], the request of each row (beam search, variable beams).
* ``IntentDecoder`` [reconstruction of GPR's HHD, mechanisms.md §2.2], off unless
  ``intent_tokens`` I > 0: the sequence-wise decoder. I learned intent queries
  self-attend among themselves and cross-attend to the encoder's U user rows (context,
  ad history, organic topics: the heterogeneous sequence) in ``n_intent_layer``
  blocks -> intents [B, I, D], once per request (inside ``encoder.onnx``). They become
  memory rows that the token-wise generator (LazyAR, over the semantic-id levels) and
  the value evaluator (``ValueHead``) attend to, before the task tokens:
  ``intent_mode="append"``: memory [user U | fake items F | intents I | T_interest,
  T_value], S = U + F + I + 2; ``"replace"`` (the paper's "compresses"): the user rows
  leave the memory, [fake items | intents | task tokens], S = F + I + 2.
* ``LazyARDecoder`` [reconstruction of GR4AD's LazyAR, mechanisms.md §1.3]: N blocks
  (causal self-attention over id positions, cross-attention to memory, MLP). In
  ``lazy_ar`` mode the lower N−M blocks see only the memory and learned per-level
  queries, never a generated token, so they run once per request for all levels
  and beams (``lower`` [B, T, D]); the generated prefix (sum of the embeddings of
  y_<t, so y_{t-1} and its ancestors) is added at the input of the top M blocks, the
  only ones a decoding step runs. In ``full_ar`` mode the token is
  added before block 0 and every step runs all N blocks. Both modes have the same
  parameters, so weights are interchangeable.
* ``ValueHead`` [reconstruction of OneRanker's ranking decoder, §3]: each candidate
  id is a query that cross-attends to the encoder's memory (K/V pass-through, no
  re-encoding) -> pCTR, pCVR.
* MTP [reconstruction of GPR's multi-token prediction, §2.3]: predict the ids of the
  user's next ``mtp_heads`` future positives (horizons h = 1..n after the immediate
  target, horizon 0). ``mtp_mode="decoder"``: each future id is decoded teacher-forced
  through the decoder's own blocks (lower, top, output projection), conditioned on a
  learned horizon embedding e_h [n, D] added to every level query; training only, the
  served path (horizon 0) never reads e_h. ``mtp_mode="pooled"`` (the earlier form):
  residual MLP heads on the mean-pooled memory plus the level queries, projected by the
  decoder's output projection, skipping its blocks.
* Prior-conditioned heads [reconstruction of "Don't Waste It", §4], off unless
  ``prior_heads > 0``. Composed hierarchically, interaction type first, then time
  horizon: z_type = h + MLP_type(h), z_{type,hz} = z_type + MLP_{type,hz}(z_type), every
  leaf with the shared output projection (``prior_horizons = 1``: the type heads are
  the leaves). L = prior_heads·prior_horizons leaves, type-major: (click, short),
  (click, long), (conversion, short), (conversion, long). Training routes each target
  to its leaf (:meth:`LazyARDecoder.leaf`); inference mixes the leaves' distributions
  by a per-request log mixture ``prior_log_mix`` [B, L]: ``predicted`` (a small
  classifier on the pooled memory, trained with CE on the routing labels; the paper's
  "predicted prior distribution") or ``fixed`` (``prior_mix``). The horizon label is
  our definition [reconstruction]: short-term when the target's level-0 semantic code
  is among those of the ``short_horizon`` most recent history ads
  (:func:`learner.data.horizon_of`), long-term otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streams.features import (
    DEFAULT_CONTEXT_BUCKETS,
    DEFAULT_CONTEXT_FEATURES,
    DEFAULT_ORGANIC_LEN,
)

NEG = -1e9  # additive mask value (finite, so fully-masked rows never give NaN)
MODES = ("lazy_ar", "full_ar")
PRIOR_MIX_MODES = ("predicted", "fixed")
MTP_MODES = ("decoder", "pooled")
INTENT_MODES = ("append", "replace")


@dataclass
class ModelConfig:
    level_sizes: tuple[int, ...]
    """Vocabulary size of every id position (the tokenizer's ``token_sizes``)."""
    semantic_levels: int = 3
    history_len: int = 20
    context_features: tuple[str, ...] = DEFAULT_CONTEXT_FEATURES
    context_buckets: int = DEFAULT_CONTEXT_BUCKETS
    organic_len: int = DEFAULT_ORGANIC_LEN
    """Organic-history slots: the ``context`` input holds ``len(context_features)``
    context ids followed by ``organic_len`` hashed organic topic ids
    (:func:`streams.features.request_ids`; 0 = padding). 0 = no organic input (as in
    checkpoints written before it existed); extra context columns are ignored."""
    d_model: int = 64
    n_head: int = 4
    n_enc_layer: int = 2
    n_layer: int = 4
    """Decoder blocks N."""
    n_top: int = 1
    """M: decoder blocks that see the previous token (LazyAR); ignored in full_ar."""
    mode: str = "lazy_ar"
    inject_mlp: bool = True
    """A residual MLP over the injected prefix vector (the sum of the chosen tokens'
    embeddings) before it enters the first token-taking block: the token path gets a
    non-linear layer of its own, which LazyAR with M=1 otherwise lacks (its one top
    block has to mix prefix and user in a single step). Same in both modes."""
    mtp_heads: int = 2
    """MTP horizons n: the user's next n future positives (0 = no MTP)."""
    mtp_mode: str = "pooled"
    """``"pooled"``: MLP heads on the pooled memory (the default, and the form of
    checkpoints written before this setting existed); ``"decoder"``: future ids decoded
    through the decoder's blocks with a horizon embedding (off by default: it lowered the
    closed-loop RPM, learner/README.md). See the module docstring."""
    prior_heads: int = 0
    """Interaction-type prior heads (0 = off; 2 = the data's ``prior``: 0 click,
    1 conversion)."""
    prior_horizons: int = 2
    """Time-horizon heads composed under each type head (the data's ``horizon``: 0 short-
    term, 1 long-term); 1 = flat type heads (checkpoints written before horizons existed)."""
    short_horizon: int = 3
    """A target is short-term when its level-0 code is among the level-0 codes of this
    many most recent history ads (:func:`learner.data.horizon_of`)."""
    prior_mix_mode: str = "predicted"
    """How inference mixes the leaf heads: ``predicted`` (a prior classifier on the pooled
    memory) or ``fixed`` (``prior_mix``; checkpoints written before the classifier)."""
    prior_mix: tuple[float, ...] = field(default_factory=tuple)
    """Fixed inference mixture over the leaf heads, type-major (uniform when empty)."""
    n_value_layers: int = 1
    value_own_items: bool = True
    """The value head has its own item table instead of the generator's, so generator
    updates (RSPO, VSL) never move the scores that rank the slate. Checkpoints written
    before this setting existed load with ``False`` (shared table)."""
    task_tokens: bool = False
    """OneRanker task tokens [T_interest, T_value] after the user sequence (see
    :class:`UserEncoder`): T_interest conditions the generator, T_value the ranker."""
    fake_items: bool = False
    """OneRanker Fake Item Tokens: one learnable candidate-like token per level-0
    semantic code in the encoder's sequence (see :class:`UserEncoder`)."""
    ranker_kv: bool = False
    """The ranking decoder cross-attends to the generator's cached keys/values
    (``memory_kv``, KV pass-through) instead of projecting its own from the memory."""
    intent_tokens: int = 0
    """GPR's HHD intent decoder: I learned intent queries decoded over the user rows into
    I memory rows (see :class:`IntentDecoder`); 0 = off (as in checkpoints written before
    it existed)."""
    n_intent_layer: int = 1
    """Blocks of the intent decoder (self-attention among the intents, cross-attention to
    the user rows, MLP)."""
    intent_mode: str = "append"
    """``"append"``: the intents are added to the memory after the user rows (and fake
    items); ``"replace"``: they stand in for the user rows (the memory keeps fake items,
    intents and task tokens only)."""
    value_factors: bool = True
    """Factorised logit terms of the value head beside its decoder output (see
    :class:`ValueHead`): a per-item bias (hashed full id) shrunk to 0, so to the rest of
    the logit (the cell prior, the wide terms), and user × item interactions (context
    rows, pooled history and organic topics × the candidate's semantic and business
    tokens). Checkpoints written before
    it existed load with ``False``."""
    value_factors_cvr: bool = False
    """The factorised terms on pCVR too (off: pCTR only; pCVR stays the cell prior plus
    the decoder's output: with tens of conversions in the logs, per-item and interaction
    terms of pCVR overfit and the winner's curse takes the CPA ads' ranking)."""
    value_rank: int = 16
    """Rank of the value head's user × item interaction, per head (pCTR, pCVR)."""
    value_buckets: int = 4093
    """Rows of the value head's hashed per-item bias table."""
    value_wide: bool = False
    """Wide crossed terms of the value head, read from the raw request ids (value.onnx then
    takes ``context``): every context value × the candidate's industry and level-0 code,
    and the user's organic-topic shares × the same (see :class:`ValueHead`). Checkpoints
    written before it existed load with ``False``."""
    value_wide_goal: bool = False
    """The wide terms key on the candidate's goal (bid type) too: a weight per goal and
    per (context value, goal) and (organic topic, goal) cell beside the industry's and
    the level-0 code's. Checkpoints written before it existed load with ``False``."""
    value_topic_match: bool = False
    """A wide term, one weight per head, for how well the candidate's content matches
    the user's recent organic topics (:meth:`ValueHead.topic_match`); needs
    ``value_wide``. Checkpoints written before it existed load with ``False``."""
    value_match_dim: int = 0
    """Dimension of the topic and item vectors of that term (the tokenizer's latent)."""
    value_match_sharpness: float = 80.0
    """κ of the topic match: how sharply a candidate's content picks its topic among
    the known ones (a softmax over κ · cosine)."""
    value_match_topics: int = 256
    """Most distinct organic topics the match's normaliser holds."""
    value_exact_match: bool = False
    """Two more match weights per head: the share of the user's recent organic topics
    that are the candidate's own topic exactly, and that are in its industry
    (:meth:`ValueHead.match_features`); needs ``value_topic_match``."""
    value_share_interest: bool = False
    """The pCVR logit adds γ × the pCTR logit's interest terms (the organic-topic
    shares × cells and the topic match; ``interest_share`` γ, fitted with them): the
    user's interest moves conversions as it moves clicks, and clicks are many times
    more. Needs ``value_wide``. Checkpoints written before it existed load with
    ``False``."""
    value_exposure: bool = False
    """A wide pCTR term w · log(1 + n), n the user's earlier impressions of the candidate
    (creative fatigue; counted by the server, :mod:`server.exposure`, value.onnx's
    ``exposure`` input). Needs ``value_wide``. Checkpoints written before it existed
    load with ``False``."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.level_sizes = tuple(int(s) for s in self.level_sizes)
        self.context_features = tuple(self.context_features)
        self.prior_mix = tuple(float(p) for p in self.prior_mix)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 1 <= self.n_top <= self.n_layer:
            raise ValueError(f"n_top (M={self.n_top}) must be in 1..n_layer ({self.n_layer})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} not divisible by n_head {self.n_head}")
        if self.prior_horizons < 1:
            raise ValueError(f"prior_horizons must be >= 1, got {self.prior_horizons}")
        if self.prior_mix_mode not in PRIOR_MIX_MODES:
            raise ValueError(f"prior_mix_mode must be one of {PRIOR_MIX_MODES}, "
                             f"got {self.prior_mix_mode!r}")
        if self.prior_mix and len(self.prior_mix) != self.prior_leaves:
            raise ValueError(f"prior_mix needs one weight per leaf head ({self.prior_leaves})")
        if self.mtp_mode not in MTP_MODES:
            raise ValueError(f"mtp_mode must be one of {MTP_MODES}, got {self.mtp_mode!r}")
        if self.intent_mode not in INTENT_MODES:
            raise ValueError(f"intent_mode must be one of {INTENT_MODES}, "
                             f"got {self.intent_mode!r}")
        if self.intent_tokens < 0 or self.n_intent_layer < 1:
            raise ValueError(f"intent_tokens must be >= 0 and n_intent_layer >= 1, got "
                             f"{self.intent_tokens}, {self.n_intent_layer}")

    @property
    def prior_leaves(self) -> int:
        """L: leaf prior heads (types × horizons), 0 when prior heads are off."""
        return self.prior_heads * self.prior_horizons

    @property
    def id_len(self) -> int:
        return len(self.level_sizes)

    @property
    def vocab_max(self) -> int:
        return max(self.level_sizes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("level_sizes", "context_features", "prior_mix"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        # checkpoints written before ``inject_mlp`` existed have no such parameters; those
        # written before horizon heads had flat type heads mixed by ``prior_mix``, and MTP
        # heads on the pooled memory, and none had an intent decoder
        return cls(**{"inject_mlp": False, "organic_len": 0, "value_own_items": False,
                      "prior_horizons": 1, "prior_mix_mode": "fixed", "task_tokens": False,
                      "fake_items": False, "ranker_kv": False, "mtp_mode": "pooled",
                      "intent_tokens": 0, "value_factors": False, "value_wide": False,
                      "value_wide_goal": False, "value_topic_match": False,
                      "value_match_dim": 0, "value_match_sharpness": 80.0,
                      "value_match_topics": 256, "value_share_interest": False,
                      "value_exact_match": False, "value_exposure": False, **d})


# --------------------------------------------------------------------------------------
# building blocks


class Attention(nn.Module):
    """Multi-head attention of queries over keys/values with an additive ``bias``.

    Keys/values come from :meth:`keys_values` so that a context seen by many query rows
    (a request's memory, seen by all its beams or candidates) is projected once."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)

    def keys_values(self, ctx: Tensor) -> Tensor:
        """ctx [B, S, D] -> keys and values by head [B, 2, h, S, D/h]."""
        B, S, D = ctx.shape
        h = self.n_head
        return self.kv(ctx).reshape(B, S, 2, h, D // h).permute(0, 2, 3, 1, 4)

    def forward(self, x: Tensor, kv: Tensor, bias: Tensor) -> Tensor:
        """x [N, Q, D] with N = B·G (G rows per context, request-major); kv [B, 2, h, S,
        D/h]; bias broadcastable to [B, G·Q, S] -> [N, Q, D]."""
        N, Q, D = x.shape
        B, h = kv.shape[0], self.n_head
        q = self.q(x).reshape(B, -1, h, D // h).transpose(1, 2)       # [B, h, G·Q, D/h]
        att = (q @ kv[:, 0].transpose(-1, -2)) * (1.0 / math.sqrt(D // h))  # [B, h, G·Q, S]
        att = torch.softmax(att + bias.unsqueeze(1), dim=-1)
        y = (att @ kv[:, 1]).transpose(1, 2).reshape(N, Q, D)         # [N, Q, D]
        out: Tensor = self.proj(y)
        return out


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.drop(self.proj(F.gelu(self.fc(x))))
        return out


class Block(nn.Module):
    """Pre-norm block: [self-attention] -> [cross-attention to memory] -> MLP."""

    def __init__(self, d: int, n_head: int, self_attn: bool = True, cross_attn: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_s = nn.LayerNorm(d) if self_attn else None
        self.attn_s = Attention(d, n_head) if self_attn else None
        self.ln_c = nn.LayerNorm(d) if cross_attn else None
        self.attn_c = Attention(d, n_head) if cross_attn else None
        self.ln_m = nn.LayerNorm(d)
        self.mlp = MLP(d, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, self_bias: Tensor | None = None, mem: Tensor | None = None,
                mem_bias: Tensor | None = None, mem_kv: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """x [N, Q, D] -> [N, Q, D], or [N, 1, D] with ``last_only`` (only the last
        position's output is computed; self-attention still sees every position).
        Cross-attention goes to ``mem`` [N, S, D], or to its precomputed ``mem_kv``
        [B, 2, h, S, D/h] (``self.attn_c.keys_values``) shared by G = N/B rows."""
        if self.attn_s is not None and self.ln_s is not None and self_bias is not None:
            y = self.ln_s(x)
            kv = self.attn_s.keys_values(y)
            if last_only:
                x, y, self_bias = x[:, -1:], y[:, -1:], self_bias[..., -1:, :]
            x = x + self.drop(self.attn_s(y, kv, self_bias))
        elif last_only:
            x = x[:, -1:]
        if self.attn_c is not None and self.ln_c is not None and mem_bias is not None:
            if mem_kv is None and mem is not None:
                mem_kv = self.attn_c.keys_values(mem)
            if mem_kv is not None:
                x = x + self.drop(self.attn_c(self.ln_c(x), mem_kv, mem_bias))
        return x + self.mlp(self.ln_m(x))


class ItemEmbedding(nn.Module):
    """One flat table; token ``c`` at id position ``t`` is row ``offset[t] + c``."""

    offsets: Tensor

    def __init__(self, level_sizes: tuple[int, ...], d: int) -> None:
        super().__init__()
        offsets = torch.tensor([0, *level_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)        # [T]
        self.table = nn.Embedding(sum(level_sizes), d)

    def tokens(self, codes: Tensor) -> Tensor:
        """codes [..., P] at positions 0..P-1 -> [..., P, D] (one vector per token)."""
        P = codes.shape[-1]
        out: Tensor = self.table(codes + self.offsets[:P])
        return out

    def items(self, ids: Tensor) -> Tensor:
        """Full ids [..., T] -> [..., D] (sum of the token vectors)."""
        return self.tokens(ids).sum(-2)


def _share(module: nn.Module, items: ItemEmbedding) -> None:
    """Give ``module`` the model's one item table without registering it again (so it
    appears once in the state dict, as ``items.*``)."""
    object.__setattr__(module, "items", items)


def key_bias(mask: Tensor) -> Tensor:
    """mask [N, S] (1 = attend) -> additive bias [N, 1, S]."""
    return ((1.0 - mask) * NEG).unsqueeze(1)


# --------------------------------------------------------------------------------------
# the three parts


class IntentDecoder(nn.Module):
    """GPR's sequence-wise intent decoder [reconstruction of HHD, mechanisms.md §2.2]:
    (user rows [B, U, D], user_mask [B, U]) -> intents [B, I, D].

    I learned queries, ``n_intent_layer`` blocks: self-attention among the intents (no
    order between them, so no causal mask), cross-attention to the user rows (padding
    masked), MLP; then a LayerNorm, so the intents enter the memory at the scale of the
    encoder's rows. The paper names the decoder and says it compresses the
    heterogeneous sequence into intent embeddings; the query count, the blocks and what
    they read are our choice."""

    full: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, n = cfg.d_model, cfg.intent_tokens
        self.intent_query = nn.Parameter(torch.zeros(n, d))             # [I, D]
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, dropout=cfg.dropout)
                                    for _ in range(cfg.n_intent_layer))
        self.ln_f = nn.LayerNorm(d)
        self.register_buffer("full", torch.zeros(1, n, n), persistent=False)  # [1, I, I]

    def forward(self, user: Tensor, user_mask: Tensor) -> Tensor:
        x = self.intent_query.unsqueeze(0).expand(user.shape[0], -1, -1)  # [B, I, D]
        bias = key_bias(user_mask)                                       # [B, 1, U]
        for blk in self.blocks:
            x = blk(x, self.full, user, bias)
        out: Tensor = self.ln_f(x)
        return out


class UserEncoder(nn.Module):
    """(history [B, H, T], history_mask [B, H], context [B, C + O]) -> memory [B, S, D].

    ``context`` holds C context feature ids then O organic topic ids (O =
    ``cfg.organic_len``); the organic ids become O more tokens of the sequence
    (their own embedding + position), masked where 0. These U = C + H + O tokens are
    the user sequence.

    Two kinds of tokens may follow it [reconstruction of OneRanker, mechanisms.md §3]:

    * Fake Item Tokens (``cfg.fake_items``): F = level_sizes[0] candidate-like tokens,
      token c = the item table's vector of level-0 code c plus a learned offset. The
      paper only says "learnable placeholder item embeddings"; one per coarse
      semantic cluster is our choice: the generator attends to a summary of every
      region of the catalogue as seen from this user, without knowing the target.
    * Task tokens (``cfg.task_tokens``): T_interest then T_value, last.

    Attention is causal *between groups* (user < fake items < T_interest < T_value): a
    token sees every token of its own group and of earlier groups. So the user tokens
    are encoded as without the extras, and T_interest never sees T_value. The memory
    mask returned hides T_value from the generator (decoder and MTP); its state, the
    memory's last row, is read by the ranker (:class:`ValueHead`) only. T_interest's
    state (the row before it) is added to the decoder's level queries
    (:meth:`LazyARDecoder.lower`).

    With ``cfg.intent_tokens`` I > 0 the :class:`IntentDecoder` runs after the blocks on
    the U encoded user rows alone (never the fake items or task tokens) and its I rows
    go in before the task tokens: memory [user | fake items | intents | T_interest,
    T_value] (``intent_mode="append"``; ``"replace"`` drops the user rows: [fake items |
    intents | T_interest, T_value]). The intents are generator-visible (mask 1), and
    ``memory[:, -2]``/``[:, -1]`` stay T_interest/T_value. The encoder's own tokens never
    see the intents (they are decoded afterwards), so every other row is the same with
    and without them given the same weights [reconstruction: the order is our choice].
    """

    items: ItemEmbedding
    fake_codes: Tensor
    groups: Tensor

    def __init__(self, cfg: ModelConfig, items: ItemEmbedding) -> None:
        super().__init__()
        d = cfg.d_model
        _share(self, items)
        self.hist_pos = nn.Parameter(torch.zeros(cfg.history_len, d))
        self.ctx_emb = nn.Embedding(cfg.context_buckets, d)
        self.ctx_feat = nn.Parameter(torch.zeros(len(cfg.context_features), d))
        self.n_ctx = len(cfg.context_features)
        self.organic_len = cfg.organic_len
        if cfg.organic_len:
            self.org_emb = nn.Embedding(cfg.context_buckets, d)
            self.org_pos = nn.Parameter(torch.zeros(cfg.organic_len, d))
        self.n_fake = cfg.level_sizes[0] if cfg.fake_items else 0
        self.task_tokens = cfg.task_tokens
        if self.n_fake:
            self.fake = nn.Parameter(torch.zeros(self.n_fake, d))
            self.register_buffer("fake_codes", torch.arange(self.n_fake)[:, None],
                                 persistent=False)                        # [F, 1]
        if self.task_tokens:
            self.task = nn.Parameter(torch.zeros(2, d))                  # T_interest, T_value
        # group of each extra token (the user tokens are group 0)
        groups = [1] * self.n_fake + ([2, 3] if self.task_tokens else [])
        self.register_buffer("groups", torch.tensor(groups, dtype=torch.long),
                             persistent=False)                            # [F + 2]
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cross_attn=False, dropout=cfg.dropout)
                                    for _ in range(cfg.n_enc_layer))
        self.ln_f = nn.LayerNorm(d)
        self.intent = IntentDecoder(cfg) if cfg.intent_tokens else None
        self.intent_replace = cfg.intent_mode == "replace"

    def forward(self, history: Tensor, history_mask: Tensor,
                context: Tensor) -> tuple[Tensor, Tensor]:
        H = history.shape[1]
        hist = self.items.items(history) + self.hist_pos[:H]            # [B, H, D]
        feats = context[:, : self.n_ctx]
        ctx = self.ctx_emb(feats) + self.ctx_feat                       # [B, C, D]
        parts = [ctx, hist]
        masks = [torch.ones_like(feats, dtype=hist.dtype), history_mask.to(hist.dtype)]
        if self.organic_len:
            org = context[:, self.n_ctx: self.n_ctx + self.organic_len]  # [B, O]
            parts.append(self.org_emb(org) + self.org_pos)
            masks.append((org > 0).to(hist.dtype))
        user_mask = torch.cat(masks, dim=1)                             # [B, U]
        bias = key_bias(user_mask)                                      # [B, 1, U]
        n_extra = int(self.groups.shape[0])
        if n_extra:
            B = hist.shape[0]
            extra = []
            if self.n_fake:
                extra.append(self.items.tokens(self.fake_codes)[:, 0] + self.fake)  # [F, D]
            if self.task_tokens:
                extra.append(self.task)
            parts.append(torch.cat(extra, 0).unsqueeze(0).expand(B, -1, -1))
            group = torch.cat([torch.zeros_like(user_mask[0], dtype=torch.long),
                               self.groups])                            # [S]
            sees = group.unsqueeze(0) <= group.unsqueeze(1)             # [S query, S key]
            ones = torch.ones_like(user_mask[:, :1]).expand(-1, n_extra)
            bias = key_bias(torch.cat([user_mask, ones], 1)) + \
                torch.where(sees, 0.0, NEG).unsqueeze(0)                 # [B, S, S]
        x = torch.cat(parts, dim=1)                                     # [B, S, D]
        for blk in self.blocks:
            x = blk(x, self_bias=bias)
        mask = user_mask
        if n_extra:            # the extra tokens are always there; T_value is the ranker's
            seen = torch.ones_like(user_mask[:, :1]).expand(-1, n_extra - self.task_tokens)
            mask = torch.cat([user_mask, seen] + ([torch.zeros_like(user_mask[:, :1])]
                                                  if self.task_tokens else []), 1)
        memory = self.ln_f(x)
        if self.intent is not None:
            U, cut = user_mask.shape[1], user_mask.shape[1] + self.n_fake
            intents = self.intent(memory[:, :U], user_mask)              # [B, I, D]
            first = U if self.intent_replace else 0
            memory = torch.cat([memory[:, first:cut], intents, memory[:, cut:]], 1)
            mask = torch.cat([mask[:, first:cut], torch.ones_like(intents[..., 0]),
                              mask[:, cut:]], 1)
        return memory, mask


class PriorClassifier(nn.Module):
    """The predicted prior distribution over the L leaf heads from the pooled user
    memory: (memory [B, S, D], memory_mask [B, S]) -> logits [B, L]."""

    def __init__(self, d: int, n_leaves: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, n_leaves)

    def forward(self, memory: Tensor, memory_mask: Tensor) -> Tensor:
        m = memory_mask.unsqueeze(-1)
        pooled = (memory * m).sum(1) / m.sum(1).clamp_min(1.0)          # [B, D]
        out: Tensor = self.out(F.gelu(self.fc(self.ln(pooled))))
        return out


class LazyARDecoder(nn.Module):
    """Per-level id generation; see the module docstring for lazy vs full AR and for
    the prior heads."""

    items: ItemEmbedding
    invalid: Tensor
    causal: Tensor
    log_mix: Tensor

    def __init__(self, cfg: ModelConfig, items: ItemEmbedding) -> None:
        super().__init__()
        d, T, V = cfg.d_model, cfg.id_len, cfg.vocab_max
        _share(self, items)
        self.lazy = cfg.mode == "lazy_ar"
        self.start = cfg.n_layer - cfg.n_top if self.lazy else 0  # first block that sees tokens
        self.task_tokens = cfg.task_tokens
        self.level_sizes = cfg.level_sizes
        self.level_query = nn.Parameter(torch.zeros(T, d))
        self.bos = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, dropout=cfg.dropout)
                                    for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        # one output projection per id position, stacked and padded to V: [T, V, D]
        self.head_w = nn.Parameter(torch.zeros(T, V, d))
        self.head_b = nn.Parameter(torch.zeros(T, V))
        invalid = torch.zeros(T, V)
        for t, size in enumerate(cfg.level_sizes):
            invalid[t, size:] = NEG
        self.register_buffer("invalid", invalid, persistent=False)      # [T, V]
        causal = torch.full((T, T), NEG).triu(1)
        self.register_buffer("causal", causal, persistent=False)        # [T, T]
        # prior heads: type heads, then (hierarchical) horizon heads under each, type-major
        self.priors = nn.ModuleList(MLP(d) for _ in range(cfg.prior_heads))
        self.n_horizons = cfg.prior_horizons if cfg.prior_heads else 1
        self.prior_sub = nn.ModuleList(MLP(d) for _ in range(
            cfg.prior_leaves if self.n_horizons > 1 else 0))
        self.n_leaves = cfg.prior_leaves
        self.prior_clf = PriorClassifier(d, self.n_leaves) \
            if self.n_leaves and cfg.prior_mix_mode == "predicted" else None
        self.inject_ln = nn.LayerNorm(d) if cfg.inject_mlp else None
        self.inject_mlp = MLP(d) if cfg.inject_mlp else None
        mix = torch.tensor(cfg.prior_mix or [1.0] * self.n_leaves)
        self.register_buffer("log_mix", (mix / mix.sum().clamp_min(1e-12)).log(),
                             persistent=False)                          # [L]

    # -- prior heads -------------------------------------------------------------------
    def leaf(self, prior: Tensor, horizon: Tensor | None = None) -> Tensor:
        """Routing label -> leaf head: interaction type ``prior`` and ``horizon`` (0
        short, 1 long; any shape) -> type·n_horizons + horizon."""
        if self.n_horizons == 1 or horizon is None:
            return prior * self.n_horizons
        return prior * self.n_horizons + horizon.clamp(0, self.n_horizons - 1)

    def prior_states(self, h: Tensor) -> list[Tensor]:
        """h [..., D] -> the L leaf states [..., D], type-major: z_type = h +
        MLP_type(h), z_{type,hz} = z_type + MLP_{type,hz}(z_type)."""
        zs: list[Tensor] = []
        nh = self.n_horizons
        for i, mlp in enumerate(self.priors):
            z = h + mlp(h)
            if nh == 1:
                zs.append(z)
            else:
                zs.extend(z + sub(z) for sub in self.prior_sub[i * nh: (i + 1) * nh])
        return zs

    def prior_logits(self, memory: Tensor, memory_mask: Tensor) -> Tensor | None:
        """The prior classifier's logits over the leaves [B, L] (``predicted`` mode),
        else None."""
        return self.prior_clf(memory, memory_mask) if self.prior_clf is not None else None

    def prior_log_mix(self, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Per-request log mixture over the leaves [B, L] (sums to one in probability):
        the classifier's log-softmax, or the fixed ``prior_mix`` for every request."""
        logits = self.prior_logits(memory, memory_mask)
        if logits is not None:
            return torch.log_softmax(logits, dim=-1)
        return self.log_mix.unsqueeze(0).expand(memory.shape[0], -1)

    def lower(self, memory: Tensor, memory_mask: Tensor,
              query_shift: Tensor | None = None) -> Tensor:
        """Token-independent states, once per request: [B, S, D] -> [B, T, D]. With task
        tokens the level queries start from T_interest's state (memory row S-2).
        ``query_shift`` [B, D] is added to every level query (MTP's horizon embedding;
        None on the served path)."""
        B, T = memory.shape[0], self.level_query.shape[0]
        x = self.level_query.unsqueeze(0).expand(B, T, -1)
        if self.task_tokens:
            x = x + memory[:, -2:-1]
        if query_shift is not None:
            x = x + query_shift.unsqueeze(1)
        bias = key_bias(memory_mask)
        for blk in self.blocks[: self.start]:
            x = blk(x, self.causal.unsqueeze(0), memory, bias)
        return x

    def memory_kv(self, memory: Tensor) -> Tensor:
        """Cross-attention keys/values of the memory for the M blocks that take tokens,
        once per request: memory [B, S, D] -> [B, M, 2, h, S, D/h]."""
        kvs = []
        for blk in self.blocks[self.start:]:
            assert isinstance(blk, Block) and blk.attn_c is not None
            kvs.append(blk.attn_c.keys_values(memory))                     # [B, 2, h, S, D/h]
        return torch.stack(kvs, dim=1)

    def top(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor, prev: Tensor,
            rows: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Hidden states for positions 0..P given the P tokens ``prev`` [N, P] -> [N, P+1, D]
        (only position P, [N, 1, D], with ``last_only``).

        Per-request inputs: memory_kv [B, M, 2, h, S, D/h], memory_mask [B, S],
        lower [B, T, D]. ``rows`` [N] is the request of each row (any order, any count
        per request); without it the rows are request-major, N/B per request."""
        if rows is not None:  # each row's request states: [B, ...] -> [N, ...]
            memory_kv, memory_mask, lower = memory_kv[rows], memory_mask[rows], lower[rows]
        B, D = lower.shape[0], lower.shape[2]
        N, P1 = prev.shape[0], prev.shape[1] + 1
        # position t gets the chosen prefix y_<t as the sum of its token vectors
        inject = torch.cat([self.bos.expand(N, 1, -1), self.items.tokens(prev).cumsum(1)], 1)
        if self.inject_mlp is not None and self.inject_ln is not None:
            inject = inject + self.inject_mlp(self.inject_ln(inject))     # [N, P+1, D]
        x = (lower[:, None, :P1] + inject.reshape(B, -1, P1, D)).reshape(N, P1, D)
        causal, bias = self.causal[:P1, :P1].unsqueeze(0), key_bias(memory_mask)  # [1, P+1, P+1]
        top = self.blocks[self.start:]
        for i, blk in enumerate(top):
            x = blk(x, causal, mem_bias=bias, mem_kv=memory_kv[:, i],
                    last_only=last_only and i == len(top) - 1)
        out: Tensor = self.ln_f(x)
        return out

    def project(self, h: Tensor, first: int | Tensor = 0, prior: Tensor | None = None,
                log_mix: Tensor | None = None) -> Tensor:
        """Logits for consecutive positions ``first..first+P-1``: h [N, P, D] -> [N, P, V].
        With prior heads: log of the leaves' mixture, weighted by ``log_mix`` [N, L] per
        row (default: the fixed ``prior_mix``), or the leaf ``prior`` [N] routes to."""
        P = h.shape[1]
        w = self.head_w[first: first + P].transpose(1, 2)               # [P, D, V]
        b = self.head_b[first: first + P] + self.invalid[first: first + P]  # [P, V]
        # per-position projection as one batched matmul: [P, N, D] @ [P, D, V] -> [N, P, V]
        proj = lambda z: (z.transpose(0, 1) @ w).transpose(0, 1) + b  # noqa: E731
        if len(self.priors) == 0:
            out: Tensor = proj(h)
            return out
        per_prior = torch.stack([proj(z) for z in self.prior_states(h)], dim=1)  # [N, L, P, V]
        if prior is not None:
            return per_prior[torch.arange(h.shape[0]), prior]
        mix = self.log_mix.unsqueeze(0) if log_mix is None else log_mix       # [N or 1, L]
        logp = torch.log_softmax(per_prior, dim=-1) + mix[:, :, None, None]
        return torch.logsumexp(logp, dim=1)

    def target_logprob(self, h: Tensor, ids: Tensor, allowed: Tensor | None = None,
                       log_mix: Tensor | None = None, prior: Tensor | None = None) -> Tensor:
        """log p(ids[:, t]) at levels t = 0..P-1 from their hidden states: h [N, P, D],
        ids [N, P] -> [N, P]. The values of ``log_softmax(project(h, 0, prior,
        log_mix)).gather(ids)`` (prior mixture included, or the routed leaf ``prior`` [N]
        alone), but each level is projected onto its own vocabulary only, not padded to
        V, and no [N, P, V] tensor is built.

        ``allowed`` [N, P, V] bool: renormalize each level over the allowed codes only
        (the children of the id's prefix in the servable trie), as the server's beam
        search scores a level; the target code must be allowed."""
        zs = [h] if len(self.priors) == 0 else self.prior_states(h)
        if prior is not None and len(zs) > 1:                 # the routed leaf's state
            zs = [torch.stack(zs, 1)[torch.arange(h.shape[0]), prior]]
        mix = None
        if len(zs) > 1:
            mix = (self.log_mix[:, None] if log_mix is None else log_mix.T)[..., None]
        out = []
        for t in range(ids.shape[1]):
            size = self.level_sizes[t]
            w, b, tgt = self.head_w[t, :size], self.head_b[t, :size], ids[:, t:t + 1]
            logits = [F.linear(z[:, t], w, b) for z in zs]                 # [N, size_t] each
            if len(zs) == 1 and allowed is None:
                lp = logits[0].gather(1, tgt)[:, 0] - logits[0].logsumexp(1)
            else:
                level = logits[0] if mix is None else torch.logsumexp(
                    torch.stack([x.log_softmax(1) for x in logits]) + mix, 0)  # mixture
                norm = level if allowed is None else \
                    level.masked_fill(~allowed[:, t, :size], -torch.inf)
                lp = level.gather(1, tgt)[:, 0] - norm.logsumexp(1)
            out.append(lp)
        return torch.stack(out, 1)

    def rows_of(self, per_request: Tensor | None, rows: Tensor | None,
                n_rows: int) -> Tensor | None:
        """A per-request tensor [B, ...] for each of ``n_rows`` rows: indexed by ``rows``
        [N], or repeated N/B times (request-major rows) without it."""
        if per_request is None or len(self.priors) == 0:
            return None
        if rows is not None:
            return per_request[rows]
        return per_request.repeat_interleave(n_rows // per_request.shape[0], dim=0)

    def step(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
             rows: Tensor | None, prefix: Tensor,
             prior_log_mix: Tensor | None = None) -> Tensor:
        """One decoding step: logits [N, V] for level P = prefix.shape[1] (see :meth:`top`).
        ``prior_log_mix`` [B, L]: each request's mixture over the leaf heads (default:
        the fixed ``prior_mix``)."""
        h = self.top(memory_kv, memory_mask, lower, prefix, rows, last_only=True)  # [N, 1, D]
        mix = self.rows_of(prior_log_mix, rows, prefix.shape[0])
        return self.project(h, prefix.shape[1], log_mix=mix)[:, 0]

    def teacher_forced(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor, ids: Tensor,
                       prior: Tensor | None = None,
                       prior_log_mix: Tensor | None = None) -> Tensor:
        """Logits at every level given the true ids [N, T] (request-major, N/B per
        request) -> [N, T, V] (one pass); ``prior`` [N] routes each row to a leaf head,
        ``prior_log_mix`` [B, L] mixes them per request."""
        mix = self.rows_of(prior_log_mix, None, ids.shape[0])
        return self.project(self.top(memory_kv, memory_mask, lower, ids[:, :-1]), 0, prior,
                            mix)


def shrunk_rate_logits(events: Tensor, trials: Tensor, row: Tensor, group: Tensor,
                       n_rows: int, n_groups: int, m: float) -> tuple[Tensor, float]:
    """Empirical-Bayes rates per (row, group) cell as logits [n_rows, n_groups].

    Per observation: ``events`` and ``trials`` (float), its ``row`` and ``group``
    indices. Rate of a group = (events + m·p) / (trials + m) with p the overall rate;
    rate of a cell = (events + m·rate of its group) / (trials + m): cells with little
    evidence stay near their group, groups near the overall rate."""
    ev, tr = events.double(), trials.double()
    p = float((ev.sum() + 1.0) / (tr.sum() + 2.0))
    g_ev = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, ev)
    g_tr = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, tr)
    p_group = (g_ev + m * p) / (g_tr + m)
    cell = row * n_groups + group
    c_ev = torch.zeros(n_rows * n_groups, dtype=torch.float64).index_add_(0, cell, ev)
    c_tr = torch.zeros(n_rows * n_groups, dtype=torch.float64).index_add_(0, cell, tr)
    rate = (c_ev.reshape(n_rows, n_groups) + m * p_group) / (c_tr.reshape(n_rows, n_groups) + m)
    return torch.logit(rate.clamp(1e-5, 1 - 1e-5)).float(), p


POSITIONS = 10
"""Slate positions with their own pCTR offset in the value head's linear fit (later
ones share the last; :func:`learner.value_fit.fit_linear`); the served graph scores
every candidate at position 0 (offset 0)."""


class ValueHead(nn.Module):
    """OneRanker-style ranking decoder: candidates [B, K, T] -> (pCTR, pCVR) logits [B, K].

    Each candidate (the sum of its token vectors, plus T_value's state with task tokens)
    is a query that cross-attends to the user; candidates never see each other. The
    keys/values it attends to are, with ``cfg.ranker_kv``, the generator's own cached
    ``memory_kv`` (KV pass-through [reconstruction of OneRanker, mechanisms.md §3]):
    block i reads the keys/values of the generator's token-taking block min(i, M-1),
    read-only (detached: the value loss trains the ranker's queries and MLPs, never the
    generator's projections). Without it each block projects its own keys/values from
    the encoder's memory.

    The logits are a prior plus what the decoder learns on top of it. The prior is the
    empirical-Bayes base rate of the candidate's (industry, bid type/goal) cell, read
    from its business tokens (id levels ``semantic_levels`` and ``semantic_levels + 1``)
    and set from the logs by :meth:`set_priors`: rare cells and rare events (conversions)
    stay near their parent's rate instead of following noise. All zeros (no prior) until
    set, and in models saved before it existed.

    With ``cfg.value_factors`` two factorised terms join the logits (the terms a
    factorised logistic pCTR·pCVR model has, learned end to end):

    * a per-item bias b_item [2] from a table of ``value_buckets`` rows keyed by a hash
      of the candidate's full id (every token: one row per ad, up to rare collisions).
      It starts at 0 and its L2 penalty (:meth:`penalty`, weight ``bias_l2`` set by
      pretraining from the data size) is a Gaussian prior centred on 0: an item with
      little or no data keeps its (industry, goal) cell prior, an item with many
      impressions moves away from it by what its own clicks say;
    * a user × item interaction ⟨u, v⟩ per head, rank ``value_rank``: u is a linear map
      of the encoder's context rows (one per context feature, in order), the masked
      mean of its history rows and of its organic-topic rows (the user sequence comes
      first in the memory; with intents in ``replace`` mode, the masked mean of the
      whole memory in the history's slot); v the sum of the candidate's semantic-level
      and business token vectors (own table, suffix left out) plus a constant (the
      user's first-order term). Context × industry and interest × category effects
      are such products.

    With ``cfg.value_wide`` the terms of a wide (logistic) model join them, read from
    the request's raw ids (``context``: the context-value ids, then the organic topic
    ids) rather than from the encoder's memory: a weight per industry and per level-0
    code (the candidate's own), per (context value, industry) and (context value,
    level-0 code) cell, summed over the context features, and per (organic topic,
    industry) and (organic topic, level-0 code), weighted by the topic's share of the
    user's recent organic items, count / (n + 2). All start at 0 under an L2 prior
    (``wide_l2``, set by pretraining from the data size like ``bias_l2``), so a cell
    with little data adds nothing; :func:`learner.value_fit.fit_linear` fits them (with
    the per-item biases) to convergence after pretraining. With ``cfg.value_exposure``
    one more weight, on pCTR: w · log(1 + n), n how often the user has been shown the
    candidate (``exposure`` [B, K], counted by the server; 0 when not given).

    Last comes a fixed affine map per head (``calibration`` [2, 2]: scale, shift of the
    logit; identity until :func:`learner.value_fit.calibrate` fits it on held-out logs),
    part of the graph, so value.onnx serves calibrated probabilities."""

    items: ItemEmbedding
    decoder: LazyARDecoder
    prior_logit: Tensor
    calibration: Tensor
    bias_l2: Tensor
    wide_l2: Tensor
    linear_position: Tensor
    item_topic: Tensor
    topic_industry: Tensor
    linear_fit: Tensor
    hash_mult: Tensor
    factor_heads: Tensor
    topic_vec: Tensor
    known_topics: Tensor
    known_mask: Tensor
    item_vec: Tensor
    code_vec: Tensor
    interest_share: Tensor

    def __init__(self, cfg: ModelConfig, items: ItemEmbedding, decoder: LazyARDecoder) -> None:
        super().__init__()
        d = cfg.d_model
        L = cfg.semantic_levels
        self.biz = (L, L + 1) if len(cfg.level_sizes) >= L + 2 else None
        cells = (cfg.level_sizes[L], cfg.level_sizes[L + 1]) if self.biz else (1, 1)
        self.register_buffer("prior_logit", torch.zeros(2, *cells))
        self.register_buffer("calibration", torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        self.factors = cfg.value_factors
        if self.factors:
            r, T = cfg.value_rank, cfg.id_len
            # semantic levels and business tokens: the suffix (last position) only
            # separates colliding ids, which the per-item bias does
            self.n_fm = T - 1 if T > L + 1 else T
            self.fm_items = ItemEmbedding(cfg.level_sizes[: self.n_fm], 2 * r)
            self.fm_const = nn.Parameter(torch.zeros(2 * r))
            self.n_ctx, self.org_len = len(cfg.context_features), cfg.organic_len
            # memory rows after the user sequence (fake items, intents, task tokens): the
            # history's length varies (the learner drops unused trailing padding), so the
            # history and organic rows are found from the end
            self.n_after = (cfg.level_sizes[0] if cfg.fake_items else 0) + \
                cfg.intent_tokens + (2 if cfg.task_tokens else 0)
            self.user_rows = cfg.intent_tokens == 0 or cfg.intent_mode == "append"
            self.fm_user = nn.Linear((self.n_ctx + 1 + (1 if self.org_len else 0)) * d, 2 * r)
            self.rank = r
            self.item_bias = nn.Parameter(torch.zeros(cfg.value_buckets, 2))
            self.register_buffer("factor_heads", torch.tensor(
                [1.0, 1.0 if cfg.value_factors_cvr else 0.0]), persistent=False)
            self.register_buffer("bias_l2", torch.zeros(2))
            mult = [pow(1_000_003, t + 1, 2**31 - 1) for t in range(T)]
            self.register_buffer("hash_mult", torch.tensor(mult, dtype=torch.long),
                                 persistent=False)
        self.wide = cfg.value_wide
        self.match = self.share = self.exact = self.exposure = False
        if self.wide:
            if self.biz is None or not self.factors:
                raise ValueError("value_wide needs value_factors and the business tokens "
                                 "(industry, goal)")
            self.n_ctx_ids, self.n_topic_ids = len(cfg.context_features), cfg.organic_len
            self.wide_cells: tuple[int, ...] = (cfg.level_sizes[L], cfg.level_sizes[0])
            if cfg.value_wide_goal:
                self.wide_cells += (cfg.level_sizes[L + 1],)
            n = cfg.context_buckets * sum(self.wide_cells)
            self.match = bool(cfg.value_topic_match and cfg.value_match_dim > 0
                              and cfg.organic_len > 0)
            if self.match:
                dim, L0 = cfg.value_match_dim, sum(cfg.level_sizes[:L])
                # filled by learner.topic_match: each organic topic's text latent at its
                # hashed bucket, the known topics (the normaliser), each item's own
                # text latent at its value bucket, and the semantic codebooks (the
                # content of an item that has no vector of its own)
                self.register_buffer("topic_vec", torch.zeros(cfg.context_buckets, dim))
                self.register_buffer("known_topics", torch.zeros(cfg.value_match_topics,
                                                                 dim))
                self.register_buffer("known_mask", torch.zeros(cfg.value_match_topics))
                self.register_buffer("item_vec", torch.zeros(cfg.value_buckets, dim))
                self.register_buffer("code_vec", torch.zeros(L0, dim))
                self.code_offsets = [sum(cfg.level_sizes[:i]) for i in range(L)]
                self.sharpness = cfg.value_match_sharpness
                self.exact = cfg.value_exact_match
                if self.exact:
                    # filled by learner.topic_match: each item's own topic's hashed
                    # bucket, each topic's industry token (0 = not known)
                    self.register_buffer("item_topic", torch.zeros(cfg.value_buckets,
                                                                   dtype=torch.long))
                    self.register_buffer("topic_industry",
                                         torch.zeros(cfg.context_buckets, dtype=torch.long))
                self.wide_match = nn.Parameter(torch.zeros(3 if self.exact else 1, 2))
            self.share = cfg.value_share_interest
            if self.share:      # γ: set by learner.value_fit.fit_linear, fixed online
                self.register_buffer("interest_share", torch.zeros(1))
            self.exposure = cfg.value_exposure
            if self.exposure:   # [1, 2]: a table like the others; pCVR's column unused
                self.wide_exposure = nn.Parameter(torch.zeros(1, 2))
            self.wide_item = nn.Parameter(torch.zeros(sum(self.wide_cells), 2))
            self.wide_context = nn.Parameter(torch.zeros(n, 2))
            self.wide_topic = nn.Parameter(torch.zeros(n, 2))
            self.register_buffer("wide_l2", torch.zeros(2))
            # what learner.value_fit.fit_linear leaves for the online refits: each linear
            # table's curvature, the position offsets, (scale, deep, t_logs, half-life)
            for k in self.LINEAR:
                if hasattr(self, k):
                    self.register_buffer(f"{k}_curvature", torch.zeros_like(getattr(self, k)))
            self.register_buffer("linear_position", torch.zeros(POSITIONS - 1, 2))
            self.register_buffer("linear_fit", torch.zeros(4))
        if cfg.value_own_items:
            self.items = ItemEmbedding(cfg.level_sizes, d)
        else:
            _share(self, items)
        object.__setattr__(self, "decoder", decoder)   # read-only: not registered again
        self.kv_pass = cfg.ranker_kv
        self.task_tokens = cfg.task_tokens
        if self.task_tokens:
            self.task_in = nn.Linear(d, d)
        self.query = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, self_attn=False, dropout=cfg.dropout)
                                    for _ in range(cfg.n_value_layers))
        if self.kv_pass:   # keys/values come from the generator: no projection of its own
            for blk in self.blocks:
                assert isinstance(blk, Block) and blk.attn_c is not None
                del blk.attn_c.kv
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, 2)

    def forward(self, memory: Tensor, memory_mask: Tensor, candidates: Tensor,
                memory_kv: Tensor | None = None, context: Tensor | None = None,
                exposure: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """memory [B, S, D], memory_mask [B, S], candidates [B, K, T]; ``memory_kv``
        [B, M, 2, h, S, D/h], the encoder's cached keys/values (computed from ``memory``
        when not given; used only with KV pass-through); ``context`` [B, C + O], the
        encoder's ``context`` input (required with wide terms, ignored without);
        ``exposure`` [B, K], the user's earlier impressions of each candidate (None:
        none; read with ``value_exposure`` only)."""
        if self.wide and context is None:
            raise ValueError("this value head has wide terms: it needs the context ids")
        logits = self.deep_logits(memory, memory_mask, candidates, memory_kv)
        if self.factors:
            logits = logits + self.linear_logits(candidates, context, exposure=exposure)
        logits = logits * self.calibration[:, 0] + self.calibration[:, 1]
        return logits[..., 0], logits[..., 1]

    def deep_logits(self, memory: Tensor, memory_mask: Tensor, candidates: Tensor,
                    memory_kv: Tensor | None = None) -> Tensor:
        """The logits [B, K, 2] without the linear terms (:meth:`linear_logits`) and the
        calibration: the decoder's output, the interaction and the cell prior."""
        x = self.items.items(candidates) + self.query                   # [B, K, D]
        if self.task_tokens:                                            # T_value's state
            x = x + self.task_in(memory[:, -1]).unsqueeze(1)
        bias = key_bias(memory_mask)
        if self.kv_pass:
            kv = (memory_kv if memory_kv is not None
                  else self.decoder.memory_kv(memory)).detach()
        n_kv = len(self.decoder.blocks) - self.decoder.start       # M cached blocks
        for i, blk in enumerate(self.blocks):  # candidates never see each other
            if self.kv_pass:
                x = blk(x, mem_bias=bias, mem_kv=kv[:, min(i, n_kv - 1)])
            else:
                x = blk(x, mem=memory, mem_bias=bias)
        logits = self.out(self.ln_f(x))                                 # [B, K, 2]
        if self.factors:
            logits = logits + self.factor_heads * self.interaction(memory, memory_mask,
                                                                   candidates)
        return logits + self.prior_logits(candidates)

    def prior_logits(self, candidates: Tensor) -> Tensor:
        """The (industry, goal) cell prior's logits [B, K, 2] (0 without business tokens)."""
        if self.biz is None:
            return self.calibration.new_zeros(*candidates.shape[:2], 2)
        prior = self.prior_logit[:, candidates[..., self.biz[0]], candidates[..., self.biz[1]]]
        return prior.permute(1, 2, 0)

    def linear_logits(self, candidates: Tensor, context: Tensor | None,
                      tables: dict[str, Tensor] | None = None,
                      exposure: Tensor | None = None) -> Tensor:
        """The linear terms' logits [B, K, 2]: the per-item bias (on the heads of
        ``factor_heads``) and, with wide terms, :meth:`crossed` of ``context`` and the
        exposure term of ``exposure`` [B, K]; ``tables`` (:data:`LINEAR`) in place of
        the head's own."""
        t = tables if tables is not None else self.linear_tables()
        out = self.factor_heads * t["item_bias"][self.bucket(candidates)]
        if self.wide:
            assert context is not None
            out = out + self.crossed(context, candidates, t)
        if self.exposure and exposure is not None:
            out = out + self.exposure_logits(exposure, t["wide_exposure"])
        return out

    @staticmethod
    def exposure_logits(exposure: Tensor, weight: Tensor) -> Tensor:
        """[B, K, 2]: w · log(1 + n) on pCTR (``weight`` [1, 2], its pCTR column), 0 on
        pCVR, for ``exposure`` [B, K] counts n."""
        z = torch.log1p(exposure.to(weight.dtype).clamp_min(0.0))[..., None] * weight[0, 0]
        return F.pad(z, (0, 1))

    def deep_output_parameters(self) -> list[Tensor]:
        """The decoder's output layer and the interaction's user map and constant: with
        these at zero the head's logits are its prior plus its linear terms (what
        :func:`learner.value_fit.fit_linear` leaves when it serves the linear terms
        alone)."""
        out = [self.out.weight, self.out.bias]
        if self.factors:
            out += [self.fm_user.weight, self.fm_user.bias, self.fm_const]
        return out

    def linear_tables(self) -> dict[str, Tensor]:
        """The head's linear tables by name (:data:`LINEAR`)."""
        return {k: getattr(self, k) for k in self.LINEAR if hasattr(self, k)}

    def bucket(self, candidates: Tensor) -> Tensor:
        """Row of each candidate's per-item bias: a hash of its full id [B, K, T] ->
        [B, K] (integer arithmetic only, so the graph computes the same rows)."""
        h = (candidates * self.hash_mult).sum(-1)
        n = self.item_bias.shape[0]
        return h - torch.div(h, n, rounding_mode="floor") * n

    def interaction(self, memory: Tensor, memory_mask: Tensor, candidates: Tensor) -> Tensor:
        """The user × item term ⟨u, v⟩ per head [B, K, 2] (see the class docstring)."""
        B, D = memory.shape[0], memory.shape[2]
        m = memory_mask.unsqueeze(-1)
        if self.user_rows:
            C, n_org, E = self.n_ctx, self.org_len, self.n_after
            parts = [memory[:, :C].reshape(B, C * D)]
            ends = [-(n_org + E) if n_org + E else None] + \
                ([-E if E else None] if n_org else [])
            starts = [C] + ([-(n_org + E)] if n_org else [])
            for lo, hi in zip(starts, ends, strict=True):   # history rows, organic rows
                w = m[:, lo:hi]
                parts.append((memory[:, lo:hi] * w).sum(1) / w.sum(1).clamp_min(1.0))
            user = torch.cat(parts, -1)
        else:       # no user rows: the pooled memory in the history's slot
            pooled = (memory * m).sum(1) / m.sum(1).clamp_min(1.0)
            user = torch.cat([memory.new_zeros(B, self.n_ctx * D), pooled]
                             + ([torch.zeros_like(pooled)] if self.org_len else []), -1)
        u = self.fm_user(user).reshape(B, 1, 2, self.rank)
        v = self.fm_items.items(candidates[..., : self.n_fm]) + self.fm_const
        return (u * v.reshape(v.shape[0], v.shape[1], 2, self.rank)).sum(-1)

    WIDE: ClassVar[tuple[str, ...]] = ("wide_item", "wide_context", "wide_topic")
    """The wide terms' tables (:meth:`crossed`)."""
    INTEREST: ClassVar[tuple[str, ...]] = ("wide_topic", "wide_match")
    """The interest terms (the user's organic topics): pCVR shares pCTR's with
    ``value_share_interest``."""
    LINEAR: ClassVar[tuple[str, ...]] = ("item_bias", *WIDE, "wide_match", "wide_exposure")
    """Every linear table (:meth:`linear_logits`); ``wide_match`` only with
    ``value_topic_match``, ``wide_exposure`` only with ``value_exposure``."""

    def crossed(self, context: Tensor, candidates: Tensor,
                tables: dict[str, Tensor] | None = None) -> Tensor:
        """The wide terms [B, K, 2] (see the class docstring): context [B, C + O] ids (0 =
        absent or padding), candidates [B, K, T]; ``tables`` in place of the head's own
        (:data:`WIDE`, for a fit outside the module)."""
        t = tables if tables is not None else self.linear_tables()
        width = sum(self.wide_cells)
        cells = self.cells_of(candidates)
        C, n_topic = self.n_ctx_ids, self.n_topic_ids

        def term(table: Tensor, ids: Tensor, weight: Tensor) -> Tensor:
            flat = ids[:, None, :, None] * width + cells[:, :, None, :]    # [B, K, F, W]
            vals = table[flat].sum(3)                                       # [B, K, F, 2]
            return (vals * weight[:, None, :, None]).sum(2)

        ctx = context[:, :C]
        out = t["wide_item"][cells].sum(-2)         # the candidate's own cells
        out = out + term(t["wide_context"], ctx, (ctx > 0).to(out.dtype))
        interest = torch.zeros_like(out)            # what the user's organic topics add
        if self.match:
            interest = interest + (self.match_features(context, candidates)[..., None]
                                   * t["wide_match"]).sum(-2)
        if n_topic:
            topics, share = self.topic_shares(context, out.dtype)
            interest = interest + term(t["wide_topic"], topics, share)
        if self.share:   # pCVR += γ × pCTR's interest terms: [0, γ·interest_ctr]
            interest = interest + F.pad(self.interest_share * interest[..., :1], (1, 0))
        return out + interest

    def match_features(self, context: Tensor, candidates: Tensor) -> Tensor:
        """[B, K, F]: :meth:`topic_match` and, with ``value_exact_match``, the share of
        the user's recent organic topics that are the candidate's own topic, and that
        are in its industry (the same share weights as the topic match)."""
        topics, share = self.topic_shares(context, self.topic_vec.dtype)     # [B, O]
        soft = self._soft_match(topics, share, candidates)[..., None]
        if not self.exact:
            return soft
        assert self.biz is not None
        own = self.item_topic[self.bucket(candidates)]                     # [B, K]
        same = ((topics[:, None, :] == own[..., None]) & (own[..., None] > 0)).to(soft.dtype)
        ind = self.topic_industry[topics]                                   # [B, O]
        same_ind = ((ind[:, None, :] == candidates[..., self.biz[0], None])
                    & (ind[:, None, :] > 0)).to(soft.dtype)
        return torch.cat([soft, (same * share[:, None, :]).sum(-1, keepdim=True),
                          (same_ind * share[:, None, :]).sum(-1, keepdim=True)], -1)

    def topic_shares(self, context: Tensor, dtype: torch.dtype = torch.float32
                     ) -> tuple[Tensor, Tensor]:
        """The user's recent organic topic ids [B, O] (0 = padding) from the context ids,
        and each one's share weight [B, O]: 1 / (count + 2) for a present topic, 0 for
        padding (a short history counts for less)."""
        C, n_topic = self.n_ctx_ids, self.n_topic_ids
        topics = context[:, C:C + n_topic]
        present = (topics > 0).to(dtype)
        return topics, present / (present.sum(1, keepdim=True) + 2.0)

    def topic_match(self, context: Tensor, candidates: Tensor) -> Tensor:
        """[B, K]: how well each candidate's content matches the user's recent organic
        topics: Σ over those topics of the topic's share × p(topic | candidate), where
        p is a softmax over the known topics of ``sharpness`` × the cosine between the
        topic's text latent and the candidate's (its own, else its codes' sum)."""
        topics, share = self.topic_shares(context, self.topic_vec.dtype)
        return self._soft_match(topics, share, candidates)

    def _soft_match(self, topics: Tensor, share: Tensor, candidates: Tensor) -> Tensor:
        """:meth:`topic_match` from the topics and their shares (:meth:`topic_shares`)."""
        present = (topics > 0).to(share.dtype)
        codes = sum(self.code_vec[off + candidates[..., lvl]]
                    for lvl, off in enumerate(self.code_offsets))
        assert isinstance(codes, Tensor)
        codes = codes / codes.norm(dim=-1, keepdim=True).clamp_min(1e-6)   # [B, K, d]
        own = self.item_vec[self.bucket(candidates)]                        # [B, K, d]
        has_own = (own.abs().sum(-1, keepdim=True) > 0).to(codes.dtype)
        item = has_own * own + (1.0 - has_own) * codes
        sim = torch.einsum("bkd,bod->bko", item, self.topic_vec[topics])
        every = torch.einsum("bkd,nd->bkn", item, self.known_topics)
        every = every * self.sharpness + (self.known_mask - 1.0) * 1e4
        norm = torch.logsumexp(every, dim=-1, keepdim=True)                 # [B, K, 1]
        # ≤ 1 even for a topic outside the normaliser; nothing before any topic is known
        p = torch.exp((self.sharpness * sim - norm).clamp_max(0.0)) * present[:, None, :]
        return (p * share[:, None, :]).sum(-1) * self.known_mask.amax()

    def cells_of(self, candidates: Tensor) -> Tensor:
        """Each candidate's wide-table rows [..., n_cells] (``wide_cells``: its industry,
        its level-0 code and, with ``value_wide_goal``, its goal), from ids [..., T]."""
        assert self.biz is not None
        tokens = (candidates[..., self.biz[0]], candidates[..., 0],
                  candidates[..., self.biz[1]])[:len(self.wide_cells)]
        offsets = [0]
        for n in self.wide_cells[:-1]:
            offsets.append(offsets[-1] + n)
        return torch.stack([off + tok for off, tok in zip(offsets, tokens, strict=True)], -1)

    def penalty(self) -> Tensor:
        """The per-item biases' L2 term (their zero-mean Gaussian prior), to add to the
        value loss: Σ_head ``bias_l2[head]`` · Σ_rows b² (0 without factorised terms or
        before pretraining sets it: λ / impressions for pCTR, λ / clicks for pCVR, so a
        pass over the logs is the MAP fit under a prior of λ pseudo-observations)."""
        out = self.calibration.new_zeros(())
        if self.factors:
            out = out + (self.bias_l2 * self.factor_heads * self.item_bias.pow(2).sum(0)).sum()
        if self.wide:
            out = out + (self.wide_l2 * sum(getattr(self, k).pow(2).sum(0)
                                            for k in self.WIDE)).sum()
            if self.match:
                out = out + (self.wide_l2 * self.wide_match.pow(2).sum(0)).sum()
            if self.exposure:
                out = out + (self.wide_l2 * self.wide_exposure.pow(2).sum(0)).sum()
        return out

    @torch.no_grad()
    def set_priors(self, slate: Tensor, mask: Tensor, clicked: Tensor, converted: Tensor,
                   ctr_strength: float = 200.0, cvr_strength: float = 20.0
                   ) -> dict[str, float]:
        """Prior logits from shown items: slate [N, S, T] ids, mask/clicked/converted
        [N, S]. pCTR per (industry, goal) cell = (clicks + m·p_goal) / (impressions + m)
        with p_goal = (clicks_goal + m·p) / (impressions_goal + m) and p the overall rate
        (m = ``ctr_strength`` pseudo-impressions); pCVR likewise per click with
        ``cvr_strength`` pseudo-clicks. Returns the overall rates."""
        if self.biz is None:
            return {}
        keep = mask.reshape(-1) > 0
        ind = slate[..., self.biz[0]].reshape(-1)[keep].long()
        goal = slate[..., self.biz[1]].reshape(-1)[keep].long()
        clk = clicked.reshape(-1)[keep].double()
        cv = converted.reshape(-1)[keep].double() * clk
        n_ind, n_goal = self.prior_logit.shape[1:]
        self.prior_logit[0], ctr = shrunk_rate_logits(clk, torch.ones_like(clk), ind, goal,
                                                      n_ind, n_goal, ctr_strength)
        self.prior_logit[1], cvr = shrunk_rate_logits(cv, clk, ind, goal, n_ind, n_goal,
                                                      cvr_strength)
        return {"prior_ctr": ctr, "prior_cvr": cvr}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        state_dict.setdefault(prefix + "prior_logit", torch.zeros_like(self.prior_logit))
        state_dict.setdefault(prefix + "calibration", self.calibration.new_tensor(
            [[1.0, 0.0], [1.0, 0.0]]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MTPHeads(nn.Module):
    """GPR-style multi-token prediction: logits of the next n = ``mtp_heads`` future
    positives, every level: [B, n, T, V] (see the module docstring).

    ``decoder`` mode: future target h (horizon h = 1..n) is decoded teacher-forced by
    the decoder (``lower`` from the level queries + e_h, ``top`` over its own prefix,
    ``project``), so the decoder's blocks produce the future ids. Only the (request,
    horizon) pairs that have a target (``target_mask``) are decoded; the others' logits
    are 0 (the loss masks them). ``pooled`` mode ignores the targets: MLP_h over the
    pooled memory + level queries, all levels in parallel."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mode = cfg.mtp_mode
        self.n = cfg.mtp_heads
        if self.mode == "pooled":
            self.heads = nn.ModuleList(MLP(cfg.d_model) for _ in range(cfg.mtp_heads))
            self.ln = nn.LayerNorm(cfg.d_model)
        elif cfg.mtp_heads:
            self.horizon = nn.Parameter(torch.zeros(cfg.mtp_heads, cfg.d_model))  # e_h [n, D]

    def forward(self, memory: Tensor, memory_mask: Tensor, decoder: LazyARDecoder,
                target: Tensor | None = None, target_mask: Tensor | None = None) -> Tensor:
        """memory [B, S, D], memory_mask [B, S]; target [B, n, T] and target_mask [B, n]
        (decoder mode) -> logits [B, n, T, V]."""
        B, T, V = memory.shape[0], decoder.level_query.shape[0], decoder.head_w.shape[1]
        if self.n == 0:
            return memory.new_zeros(B, 0, T, V)
        if self.mode == "pooled":
            m = memory_mask.unsqueeze(-1)
            pooled = (memory * m).sum(1) / m.sum(1).clamp_min(1.0)      # [B, D]
            x = pooled.unsqueeze(1) + decoder.level_query               # [B, T, D]
            return torch.stack([decoder.project(self.ln(x + mlp(x))) for mlp in self.heads], 1)
        if target is None:
            raise ValueError("decoder-mode MTP decodes the future targets: pass target")
        mask = target_mask if target_mask is not None else target.new_ones(target.shape[:2])
        pairs = torch.nonzero(mask.reshape(-1) > 0)[:, 0]               # [R] (request, h)
        out = memory.new_zeros(B * self.n, T, V)
        if len(pairs):
            req, h = pairs // self.n, pairs % self.n
            mmask = memory_mask[req]                                    # [R, S]
            lower = decoder.lower(memory[req], mmask, self.horizon[h])  # [R, T, D]
            ids = target.reshape(B * self.n, T)[pairs]                  # [R, T]
            hid = decoder.top(decoder.memory_kv(memory)[req], mmask, lower, ids[:, :-1])
            out = out.index_copy(0, pairs, decoder.project(hid))        # [R, T, D] -> rows
        return out.reshape(B, self.n, T, V)


# --------------------------------------------------------------------------------------
# the whole model


class UserInputs(Protocol):
    history: Tensor        # [B, H, T] int64
    history_mask: Tensor   # [B, H] float32
    context: Tensor        # [B, C] int64


class GenerativeRecommender(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemEmbedding(cfg.level_sizes, cfg.d_model)
        self.encoder = UserEncoder(cfg, self.items)
        self.decoder = LazyARDecoder(cfg, self.items)
        self.value = ValueHead(cfg, self.items, self.decoder)
        self.mtp = MTPHeads(cfg)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        for name, p in m.named_parameters(recurse=False):
            if name in ("hist_pos", "ctx_feat", "org_pos", "level_query", "bos", "query",
                        "head_w", "fake", "task", "horizon", "intent_query"):
                nn.init.normal_(p, std=0.02)

    def set_mode(self, mode: str) -> None:
        """Switch lazy_ar <-> full_ar in place (same parameters)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg.mode = mode
        self.decoder.lazy = mode == "lazy_ar"
        self.decoder.start = self.cfg.n_layer - self.cfg.n_top if self.decoder.lazy else 0

    def encode(self, history: Tensor, history_mask: Tensor,
               context: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> memory [B, S, D], memory_mask [B, S], lower [B, T, D] and memory_kv
        [B, M, 2, h, S, D/h] (encoder.onnx): everything that runs once per request."""
        memory, mask = self.encoder(history, history_mask, context)
        return memory, mask, self.decoder.lower(memory, mask), self.decoder.memory_kv(memory)

    def forward(self, history: Tensor, history_mask: Tensor, context: Tensor, target: Tensor,
                prior: Tensor | None = None, mtp_target: Tensor | None = None,
                mtp_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Teacher-forced training pass. target [B, T] (mtp_target [B, n_mtp, T] and
        mtp_mask [B, n_mtp] for decoder-mode MTP) -> logits [B, T, V], mtp
        [B, n_mtp, T, V] (decoder mode: only with mtp_target), memory/memory_mask (for
        the value head); with prior heads, ``logits`` mix the leaves by the (detached)
        per-request mixture, ``prior`` [B] (leaf, :meth:`LazyARDecoder.leaf`) adds
        prior_logits [B, T, V] (the routed leaf head) and the predicted mode prior_class
        [B, L] (the prior classifier's logits)."""
        memory, mask, lower, kv = self.encode(history, history_mask, context)
        mix = self.prior_log_mix(memory, mask)
        out = {"logits": self.decoder.teacher_forced(
                   kv, mask, lower, target, prior_log_mix=None if mix is None else mix.detach()),
               "memory": memory, "memory_mask": mask}
        if self.mtp.mode == "pooled" or mtp_target is not None:
            out["mtp"] = self.mtp(memory, mask, self.decoder, mtp_target, mtp_mask)
        if prior is not None and len(self.decoder.priors) > 0:
            out["prior_logits"] = self.decoder.teacher_forced(kv, mask, lower, target, prior)
            clf = self.decoder.prior_logits(memory, mask)
            if clf is not None:
                out["prior_class"] = clf
        return out

    def prior_log_mix(self, memory: Tensor, memory_mask: Tensor) -> Tensor | None:
        """Per-request log mixture over the leaf prior heads [B, L] (encoder.onnx's
        ``prior_log_mix``), None without prior heads."""
        if self.decoder.n_leaves == 0:
            return None
        return self.decoder.prior_log_mix(memory, memory_mask)

    def level_logprob(self, batch: UserInputs, ids: Tensor) -> Tensor:
        """log p(id_t | id_<t, user) per level for K ids per request: ids [B, K, T] ->
        [B, K, T]. ``batch`` has history, history_mask and context (e.g.
        :class:`learner.data.Batch`). The encoder and lower layers run once per request."""
        return self.level_logprob_and_memory(batch, ids)[0]

    def level_logprob_and_memory(self, batch: UserInputs, ids: Tensor,
                                 encoder_grad: bool = True, allowed: Tensor | None = None
                                 ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`level_logprob` [B, K, T] plus the encoder's memory [B, S, D] and
        memory_mask [B, S], for callers that also run the value head on the same pass.
        With ``encoder_grad=False`` the log-probs' gradient stops at the encoder's output
        (the decoder and item table still learn; the memory returned keeps its graph).
        ``allowed`` [B, K, T, V] bool renormalizes each level over the allowed codes
        (:meth:`LazyARDecoder.target_logprob`)."""
        h, flat, mix, memory, mask = self._decode_ids(batch, ids, encoder_grad)
        B, K, T = ids.shape
        flat_allowed = allowed.reshape(B * K, T, -1) if allowed is not None else None
        return (self.decoder.target_logprob(h, flat, flat_allowed, mix).reshape(B, K, T),
                memory, mask)

    def _decode_ids(self, batch: UserInputs, ids: Tensor, encoder_grad: bool
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """Hidden states h [B*K, T, D] of ids [B, K, T] (request-major rows), the flat ids,
        each row's detached prior log mixture [B*K, L] (None without prior heads), memory
        and memory_mask."""
        B, K, T = ids.shape
        if encoder_grad:
            memory, mask, lower, kv = self.encode(batch.history, batch.history_mask,
                                                  batch.context)
        else:
            memory, mask = self.encoder(batch.history, batch.history_mask, batch.context)
            fixed = memory.detach()
            lower, kv = self.decoder.lower(fixed, mask), self.decoder.memory_kv(fixed)
        flat = ids.reshape(B * K, T)                        # request-major: K rows per request
        h = self.decoder.top(kv, mask, lower, flat[:, :-1])                # [B*K, T, D]
        mix = self.prior_log_mix(memory.detach(), mask)
        return h, flat, self.decoder.rows_of(mix, None, B * K), memory, mask

    def prior_level_logprob(self, batch: UserInputs, ids: Tensor, leaf: Tensor,
                            encoder_grad: bool = True, allowed: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """:meth:`level_logprob_and_memory` with prior heads, one decoder pass: the
        mixture's log-probs [B, K, T], the log-probs [B, K, T] under each id's routed leaf
        ``leaf`` [B, K], the prior classifier's logits [B, L] (None in ``fixed`` mode; its
        gradient stops at the encoder's output unless ``encoder_grad``), memory and
        memory_mask."""
        h, flat, mix, memory, mask = self._decode_ids(batch, ids, encoder_grad)
        B, K, T = ids.shape
        flat_allowed = allowed.reshape(B * K, T, -1) if allowed is not None else None
        mixture = self.decoder.target_logprob(h, flat, flat_allowed, mix).reshape(B, K, T)
        routed = self.decoder.target_logprob(h, flat, flat_allowed,
                                             prior=leaf.reshape(B * K)).reshape(B, K, T)
        clf = self.decoder.prior_logits(memory if encoder_grad else memory.detach(), mask)
        return mixture, routed, clf, memory, mask

    def sequence_logprob(self, batch: UserInputs, ids: Tensor) -> Tensor:
        """log p(id | user) summed over levels: ids [B, K, T] -> [B, K]."""
        return self.level_logprob(batch, ids).sum(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
