"""Generation with a KV cache: prefill of a (multimodal) prompt, then token-by-token decoding under ``jit``.

The cache has a static length T (``cache_len``): K and V [L, B, T, Hkv, Dh] in the compute dtype, and the token
metadata of every slot (kernels.TokenMeta [B, T]), so the attention of a cached step is the training rule of
kernels.meta applied to (query, cache) metadata: causal by position, an image's tokens see each other both ways, a
sliding window by position distance, and slots not written yet (segment 0) see nothing and are seen by nothing.

Batched prompts of different lengths are **left-padded** (``left_align``): every row writes its next token into the
same cache slot, while its RoPE position is its own (padding has segment 0, so it is invisible). A decoder layer here
is the training layer with the attention against the cache: projections and RoPE, K/V written into the cache, the
dense masked attention (kernels.attention, impl "dense": one query row per step), then the LLM's own
``attention_residual`` and ``mlp_sublayer`` (shared with training, MoE included). Every family of LLMConfig works:
GQA, sliding windows (per layer: Gemma 2 alternates), logit soft-capping, Gemma's scales and post-norms, rope scaling.

    out = generate(model, batch, max_new_tokens=16, stop_tokens=(eos,))   # model: MultimodalModel or LLM
    out.tokens [B, 16] (pad_id after a row's stop token), out.lengths [B] (tokens up to and including the stop)

**Sharded**: a model laid out on a mesh with the training layouts (build.create_model; data, fsdp, tensor, context)
generates where it lies, under its mesh: the rows are placed as data.placement places an eval batch (over data x fsdp
where that divides B), the parameters stay in their storage and are FSDP-gathered per layer as in training, the
cache's rows follow the batch axes and its K/V heads `tensor` (CACHE_NAMES), the logits are laid out per row. With a
`context` axis the prompt's prefill runs as a training forward does: the left-aligned prompt permuted on the host by
training's planner step (``context_permute``: ContextConfig's mode and block), its sequence sharded over `context`,
every projection and MLP on a rank's share, the attention the model's context-parallel method (allgather or ring) with
the metadata travelling with the keys; each layer's K/V are written into the cache in the left-aligned token order.
The cache is replicated over `context` and each decoded token runs on every context rank: one query row per step has
no sequence to split, and sharding the cache's slots would turn every step's softmax into a cross-rank merge for a
tiny matmul; the prefill, whose attention grows with the prompt squared, is what context parallelism splits. Pipeline
and expert axes are refused (``_layout``). The one-device path is unchanged.

``batch``: a contract batch (docs/contracts.md) holding prompts only, one sample per row, right-padded as the data
pipeline makes them (segment 0 = padding); labels are not needed. ``SamplingConfig``: greedy (temperature 0),
temperature, top-k, top-p, with a seed (the same seed gives the same tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax import kernels
from mllm_jax import layers as L
from mllm_jax import partitioning as part
from mllm_jax.batch import IGNORE, check_batch
from mllm_jax.kernels.meta import TokenMeta
from mllm_jax.llm import (LLM, _layer_slice, attention_residual, attention_scale, check_rope_positions, layer_ropes,
                          layer_window, mlp_sublayer, rope_tables, use_layer_params)
from mllm_jax.multimodal import MultimodalModel, llm_meta
from mllm_jax.parallel.config import ContextConfig, ParallelConfig

GLOBAL_WINDOW = 2**30  # a window no position distance reaches: the code of a global-attention layer
# The cache's logical names [L, B, T, Hkv, Dh]: on a mesh its rows lie like the activations' batch (data x fsdp) and
# its heads like the K/V projections' (tensor, where it divides n_kv_heads); layers and slots are not split.
CACHE_NAMES = (None, "batch", None, "kv_heads", None)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0: greedy (argmax). Otherwise softmax(logits / temperature) restricted to the ``top_k`` most
    likely tokens (0: all) and to the smallest set whose probability reaches ``top_p`` (1.0: all), drawn with
    ``seed`` (step i uses fold_in(PRNGKey(seed), i): the same seed gives the same tokens)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0; got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0; got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1]; got {self.top_p}")


class KVCache(NamedTuple):
    """k, v [L, B, T, Hkv, Dh]; meta: the metadata of each slot [B, T] (segment 0: empty); slot: the next slot to
    write (int32 scalar, the same for every row: prompts are left-aligned); next_pos [B]: the next token's position
    (its causal order); next_rope [B]: the next token's rotary position on every M-RoPE axis (HF Qwen2-VL: the
    prompt's largest rope position + 1, then one more per token; without M-RoPE it equals next_pos)."""

    k: jax.Array
    v: jax.Array
    meta: TokenMeta
    slot: jax.Array
    next_pos: jax.Array
    next_rope: jax.Array


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after a row's stop token
    lengths: np.ndarray  # [B] tokens generated, the stop token included
    logits: np.ndarray | None  # [B, max_new_tokens, V] float32 of each step (return_logits=True), else None


# --------------------------------------------------------------------------------------------------------------------
# Host side: prompts -> a left-aligned batch


def text_batch(prompts, *, pad_id: int = 0) -> dict:
    """Right-padded contract batch (no encoders) of token-id prompts of any lengths: one segment per row."""
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError(f"every prompt needs at least one token; got lengths {[len(p) for p in prompts]}")
    b, s = len(prompts), max(len(p) for p in prompts)
    ids = np.full((b, s), pad_id, np.int32)
    seg = np.zeros((b, s), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        seg[i, :len(p)] = 1
    return {"input_ids": ids, "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)), "segment_ids": seg,
            "span_ids": np.zeros((b, s), np.int32)}


def prompt_lengths(batch: dict) -> np.ndarray:
    """Tokens of each row's prompt (segment != 0), checked to be one right-padded sample per row."""
    seg = np.asarray(batch["segment_ids"])
    n = (seg != 0).sum(axis=1)
    for b in range(seg.shape[0]):
        if n[b] == 0:
            raise ValueError(f"row {b} of the batch has no prompt token (segment_ids all 0)")
        row = seg[b]
        if (row[:n[b]] == 0).any() or len(set(row[:n[b]].tolist())) != 1:
            raise ValueError(f"row {b}: generation takes one right-padded prompt per row (one nonzero segment id, "
                             f"then padding); got segment_ids {row.tolist()}")
    return n.astype(np.int32)


def left_align(batch: dict) -> dict:
    """The batch with each row's prompt moved to the end of the row (left padding), cut to the longest prompt.

    Every per-token array ([B, S]: ids, metadata, feature_index) rolls by the row's padding; feature indices point at
    features, not positions, so they stay valid. Encoder inputs are untouched."""
    n = prompt_lengths(batch)
    b, s = np.shape(batch["input_ids"])
    width = int(n.max())

    def roll(a, fill):  # [B, S] -> [B, width]
        a = np.asarray(a)
        out = np.full((b, width), fill, a.dtype)
        for r in range(b):
            out[r, width - n[r]:] = a[r, :n[r]]
        return out

    out = {k: roll(batch[k], 0) for k in ("input_ids", "positions", "segment_ids", "span_ids")}
    if batch.get("rope_positions") is not None:  # [B, S, 3]: rolled like the tokens, the axis kept
        rp = np.asarray(batch["rope_positions"])
        out["rope_positions"] = np.stack([roll(rp[..., a], 0) for a in range(rp.shape[-1])], axis=-1)
    if "feature_index" in batch:
        out["feature_index"] = {k: roll(v, -1) for k, v in batch["feature_index"].items()}
    if "encoder_inputs" in batch:
        # A native-resolution modality's input is a dict of packed patch rows: every array kept as it is.
        out["encoder_inputs"] = {k: jax.tree.map(np.asarray, v) for k, v in batch["encoder_inputs"].items()}
    return out


def context_permute(batch: dict, cp: int, config: ContextConfig, model_config) -> tuple[dict, np.ndarray]:
    """(a left-aligned batch permuted for context parallelism, order [B, W]: the slot of each left-aligned token).

    The training loop's own host step (data.context_batches.permute_for_context, as train.loop.prepare_host_batch
    calls it): a plan of ``config``'s mode and block over ``cp`` ranks, blocks costed from the LLM's shapes and the
    tiles of the attention kernel ``model_config.attention_impl`` runs; every token array moves with its metadata
    (feature_index and M-RoPE positions included), S' is padded to a multiple of cp x block (padding: segment 0)."""
    from mllm_jax.data.context_batches import permute_for_context

    # permute_for_context moves the labels too: a prompt has none (IGNORE everywhere), dropped after.
    full = {**batch, "labels": np.full(np.shape(batch["input_ids"]), IGNORE, np.int32)}
    out, plan = permute_for_context(full, ParallelConfig(context=cp, context_config=config), leading=0,
                                    llm_config=model_config.llm, attention_impl=model_config.attention_impl)
    out.pop("labels")
    return out, plan.inverse()


# --------------------------------------------------------------------------------------------------------------------
# The model side (pure functions of the modules, called inside jit)


def _llm(model) -> LLM:
    return model if isinstance(model, LLM) else model.llm


def window_codes(cfg) -> np.ndarray:
    """[n_layers] int32: each layer's sliding window, GLOBAL_WINDOW for global attention."""
    return np.asarray([GLOBAL_WINDOW if layer_window(cfg, i) is None else layer_window(cfg, i)
                       for i in range(cfg.n_layers)], np.int32)


def init_cache(llm: LLM, batch: int, length: int) -> KVCache:
    """An empty cache of ``length`` slots for ``batch`` rows, in the LLM's compute dtype."""
    cfg = llm.config
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.resolved_head_dim)
    dtype = L.dtype_of(llm.run.dtype)
    kv = part.constrain(jnp.zeros(shape, dtype), CACHE_NAMES)  # on a mesh: rows over the batch axes, heads over tensor
    zeros = part.constrain(jnp.zeros((batch, length), jnp.int32), ("batch", None))
    rows = part.constrain(jnp.zeros((batch,), jnp.int32), ("batch",))
    return KVCache(kv, kv, TokenMeta(zeros, zeros, zeros), jnp.zeros((), jnp.int32), rows, rows)


def _write(cache_meta: TokenMeta, meta: TokenMeta, slot) -> TokenMeta:
    return TokenMeta(*(jax.lax.dynamic_update_slice(c, m.astype(jnp.int32), (0, slot))
                       for c, m in zip(cache_meta, meta)))


def _qkv(w: dict, h_BSD, rope, cfg, lora) -> tuple:
    """q, k, v of one layer (gathered parameters ``w``) on h [B, S, D], as L.self_attention makes them: the attention
    norm, the projections, RMSNorm over head_dim before RoPE where the LLM has it (Qwen3, Gemma 3), RoPE."""
    a = w["attn"]
    x = L.rms_norm(w["attn_norm"], h_BSD, cfg.norm_eps, plus_one=cfg.norm_scale_plus_one)
    q = L.linear(a["q"], x, "bsd,dhk->bshk", ("batch", "length", "heads", "head_dim"), lora_scale=lora)
    k = L.linear(a["k"], x, "bsd,dhk->bshk", ("batch", "length", "kv_heads", "head_dim"), lora_scale=lora)
    v = L.linear(a["v"], x, "bsd,dhk->bshk", ("batch", "length", "kv_heads", "head_dim"), lora_scale=lora)
    if cfg.qk_norm:
        q = L.rms_norm(a["q_norm"], q, cfg.norm_eps, plus_one=cfg.norm_scale_plus_one)
        k = L.rms_norm(a["k_norm"], k, cfg.norm_eps, plus_one=cfg.norm_scale_plus_one)
    return L.apply_rope(q, *rope), L.apply_rope(k, *rope), v


def _cached_layers(llm: LLM, h_BSD, meta: TokenMeta, cache: KVCache, rope_positions=None) -> tuple:
    """Every decoder layer on the new tokens h [B, S, D] (metadata ``meta``; M-RoPE positions ``rope_positions``
    [B, S, 3] or None), their K/V written at ``cache.slot``; returns (h after the last layer, k, v, the cache's
    metadata with the new tokens)."""
    cfg, run = llm.config, llm.run
    values, names = llm.layer_params()
    values = jax.tree.map(part.unshard_leading, values)
    dtype = L.dtype_of(run.dtype)
    rope_global = rope_tables(cfg, meta.positions, rope_positions)
    # Gemma 3: the sliding-window layers rotate with their own base; a layer picks its table by its window code.
    rope_local = (rope_tables(cfg, meta.positions, rope_positions, local=True) if cfg.rope_local_theta is not None
                  else None)
    cache_meta = _write(cache.meta, meta, cache.slot)
    lora = run.lora_scale

    def body(carry, xs):
        h, k_all, v_all = carry
        p, window, i = xs
        w = use_layer_params(p, names, run)  # gathered, cast; an MoE layer's experts as the MoE wants them
        a = w["attn"]
        rope = rope_global
        if rope_local is not None:
            rope = tuple(jnp.where(window != GLOBAL_WINDOW, lo, gl) for lo, gl in zip(rope_local, rope_global))
        q, k, v = _qkv(w, h, rope, cfg, lora)
        # In place in the carry: only the new tokens' slots are written.
        k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], (i, 0, cache.slot, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], (i, 0, cache.slot, 0, 0))
        k_i = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False)
        v_i = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False)
        mask = kernels.mask(meta, cache_meta, window=window, span_isolated=run.span_isolated)
        o = kernels.attention(q, k_i.astype(q.dtype), v_i.astype(q.dtype), meta, cache_meta, impl="dense",
                              mask=mask, scale=attention_scale(cfg), softcap=cfg.attn_logit_softcap,
                              context_parallel=False)
        o = L.linear(a["o"], o, "bshk,hkd->bsd", ("batch", "length", "act_embed"), lora_scale=lora)
        h = mlp_sublayer(w, attention_residual(w, h, o, cfg), cfg, run)
        return (h, k_all, v_all), None

    carry = (h_BSD.astype(dtype), cache.k, cache.v)
    windows = window_codes(cfg)
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
    if run.layer_loop == "unrolled" or len(set(kinds)) > 1:
        # One copy per layer: compiled cost analyses count every layer; MoE and dense MLPs are stacked apart.
        for i in range(cfg.n_layers):
            p = jax.tree.map(lambda a: a[0], _layer_slice(values, kinds, i, i + 1))
            carry, _ = body(carry, (p, jnp.int32(windows[i]), i))
        h, k, v = carry
    else:  # lax.scan: compile time independent of depth
        xs = (values, jnp.asarray(windows), jnp.arange(cfg.n_layers, dtype=jnp.int32))
        (h, k, v), _ = jax.lax.scan(body, carry, xs)
    return h, k, v, cache_meta


def _unpermute(x_BS, order_BW, names: tuple):
    """x [B, S', ...] in a context plan's slot order -> [B, W, ...] in the original token order (``order``: the slot of
    each original token, ContextPlan.inverse). The sequence is gathered whole first (``names``: x's logical names with
    the sequence axis None), so each context rank can take any slot."""
    x = part.constrain(x_BS, names)
    idx = order_BW.reshape(order_BW.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, jnp.broadcast_to(idx, order_BW.shape + x.shape[2:]), axis=1)


def _context_prefill_layers(llm: LLM, h_BSD, meta: TokenMeta, cache: KVCache, order_BW, rope_positions=None) -> tuple:
    """The decoder layers on a prompt permuted by a context plan and sharded over `context` (h [B, S', D], its
    metadata and M-RoPE positions in slot order), as training runs them: every projection and MLP on the rank's
    S'/cp tokens, the attention kernels.attention's context-parallel path (run.context_method) with the metadata
    travelling with the keys. Each layer's K/V are written to the cache's slots [0, W) in the original (left-aligned)
    token order (``order_BW``), so the decode that follows sees the cache the one-device prefill writes. Returns
    (h [B, S', D] in slot order, k, v, the cache's metadata)."""
    cfg, run = llm.config, llm.run
    values, names = llm.layer_params()
    values = jax.tree.map(part.unshard_leading, values)
    n = cfg.n_layers
    windows = [layer_window(cfg, i) for i in range(n)]
    ropes = layer_ropes(cfg, set(windows), meta.positions, rope_positions)
    kinds = [cfg.is_moe_layer(i) for i in range(n)]
    kv_names = ("batch", None, "kv_heads", "head_dim")
    cache_meta = _write(cache.meta, TokenMeta(*(_unpermute(a, order_BW, ("batch", None)) for a in meta)), 0)
    lora = run.lora_scale

    def run_of(window):  # one scan body per window: the context-parallel kernels take a static window
        def body(carry, xs):
            h, k_all, v_all = carry
            p, i = xs
            w = use_layer_params(p, names, run)
            q, k, v = _qkv(w, h, ropes[window], cfg, lora)
            o = kernels.attention(q, k, v, meta, meta, impl=run.attention_impl, scale=attention_scale(cfg),
                                  window=window, softcap=cfg.attn_logit_softcap, span_isolated=run.span_isolated,
                                  context_method=run.context_method)
            k_all = jax.lax.dynamic_update_slice(k_all, _unpermute(k, order_BW, kv_names).astype(k_all.dtype)[None],
                                                 (i, 0, 0, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, _unpermute(v, order_BW, kv_names).astype(v_all.dtype)[None],
                                                 (i, 0, 0, 0, 0))
            o = L.linear(w["attn"]["o"], o, "bshk,hkd->bsd", ("batch", "length", "act_embed"), lora_scale=lora)
            h = mlp_sublayer(w, attention_residual(w, h, o, cfg), cfg, run)
            return (h, k_all, v_all), None

        return body

    carry = (h_BSD.astype(L.dtype_of(run.dtype)), cache.k, cache.v)
    i = 0
    while i < n:  # runs of layers of one kind and window, one lax.scan each (as apply_decoder_layers)
        j = i + 1
        while j < n and (kinds[j], windows[j]) == (kinds[i], windows[i]):
            j += 1
        carry, _ = jax.lax.scan(run_of(windows[i]), carry,
                                (_layer_slice(values, kinds, i, j), jnp.arange(i, j, dtype=jnp.int32)))
        i = j
    h, k, v = carry
    return h, k, v, cache_meta


def _last_logits(llm: LLM, h_BSD):
    """Logits [B, V] (float32) of the last token of each row."""
    return part.constrain(llm.logits(llm.final(h_BSD[:, -1:]))[:, 0], ("batch", None))  # whole vocabulary per row


def prefill(model, batch: dict, cache_len: int, order=None) -> tuple:
    """(logits [B, V] of each prompt's last token, the cache holding the prompt) for a left-aligned batch
    (``left_align``): the encoders, projectors and injection (MultimodalModel.embed), then the cached layers.

    ``order`` [B, W] (a mesh with `context` > 1): the batch is the left-aligned one permuted by a context plan
    (``context_permute``; its sequence sharded over `context`) and ``order`` gives the slot of each of the W
    left-aligned tokens: the layers run context-parallel (``_context_prefill_layers``) and fill the cache's first W
    slots in the left-aligned order."""
    llm = _llm(model)
    ids = batch["input_ids"]
    b, s = ids.shape
    width = s if order is None else order.shape[1]
    if width > cache_len:
        raise ValueError(f"the prompt has {width} tokens; the cache holds {cache_len}")
    meta = TokenMeta(*(part.constrain(jnp.asarray(batch[k], jnp.int32), ("batch", "length"))
                       for k in ("positions", "segment_ids", "span_ids")))
    if isinstance(model, MultimodalModel):
        meta = llm_meta(model.config, meta)  # media_attention="causal": placeholder tokens attend like text
    rope_positions = check_rope_positions(llm.config, batch.get("rope_positions"), (b, s))
    if rope_positions is not None:
        rope_positions = part.constrain(rope_positions, ("batch", "length", None))
    emb = llm.embed_tokens(ids) if isinstance(model, LLM) else model.embed(batch)
    cache = init_cache(llm, b, cache_len)
    if order is None:
        h, k, v, cache_meta = _cached_layers(llm, emb, meta, cache, rope_positions)
    else:
        order = part.constrain(jnp.asarray(order, jnp.int32), ("batch", None))
        h, k, v, cache_meta = _context_prefill_layers(llm, emb, meta, cache, order, rope_positions)
        h = _unpermute(h, order[:, -1:], ("batch", None, "act_embed"))  # each row's last prompt token
    valid = meta.segment_ids != 0  # the maxima below do not depend on the token order
    next_pos = (jnp.max(jnp.where(valid, meta.positions, -1), axis=1) + 1).astype(jnp.int32)
    next_rope = next_pos
    if rope_positions is not None:  # HF get_rope_index: text after the prompt continues from its largest position
        next_rope = (jnp.max(jnp.where(valid[..., None], rope_positions, -1), axis=(1, 2)) + 1).astype(jnp.int32)
    cache = KVCache(k, v, cache_meta, jnp.asarray(width, jnp.int32), next_pos, next_rope)
    return _last_logits(llm, h), cache


def decode_step(model, tokens_B, cache: KVCache) -> tuple:
    """One token per row: (logits [B, V] of the next token, the cache with this token written at its slot)."""
    llm = _llm(model)
    b = tokens_B.shape[0]
    emb = llm.embed_tokens(tokens_B[:, None])
    meta = TokenMeta(*(part.constrain(a, ("batch", "length")) for a in (
        cache.next_pos[:, None], jnp.ones((b, 1), jnp.int32), jnp.zeros((b, 1), jnp.int32))))
    rope_positions = None
    if llm.config.mrope_section is not None:  # a generated token is text: the same position on every axis
        rope_positions = part.constrain(jnp.broadcast_to(cache.next_rope[:, None, None], (b, 1, 3)),
                                        ("batch", "length", None))
    h, k, v, cache_meta = _cached_layers(llm, emb, meta, cache, rope_positions)
    return _last_logits(llm, h), KVCache(k, v, cache_meta, cache.slot + 1, cache.next_pos + 1, cache.next_rope + 1)


def sample(logits_BV, key, sampling: SamplingConfig):
    """Next tokens [B] int32 from float32 logits (SamplingConfig). The sampling numbers are traced, not static: one
    compiled program serves every temperature, top-k, top-p and seed (greedy alone is its own program)."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return _sample(logits_BV, key, *_sampling_args(sampling))


def _sampling_args(sampling: SamplingConfig) -> tuple:
    return (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))


def _sample(logits_BV, key, temperature, top_k, top_p):
    x = logits_BV.astype(jnp.float32) / temperature
    v = x.shape[-1]
    neg = jnp.finfo(jnp.float32).min
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    # top-k: keep logits >= the k-th largest (0: every token)
    kth = jax.lax.dynamic_index_in_dim(sorted_x, jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v) - 1, axis=1)
    # top-p: keep the smallest prefix of the sorted tokens whose probability reaches top_p (the first always)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    nucleus = jnp.min(jnp.where(before < top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where((x < kth) | (x < nucleus), neg, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def _llm_scope(model):
    """The LLM's logical rules (a MultimodalModel built on a mesh: build.create_model): activations and the cache
    laid out as in training. A no-op without a mesh, hence on one device."""
    return model.scope("llm") if isinstance(model, MultimodalModel) else contextlib.nullcontext()


def _generate(model, batch: dict, order, key, sampling_args, stops, pad_id, *, max_new_tokens: int, cache_len: int,
              greedy: bool, with_logits: bool):
    """Prefill (context-parallel where ``order`` is given: ``prefill``), then up to max_new_tokens - 1 cached steps in
    a while_loop that ends once every row has stopped."""
    with _llm_scope(model):
        return _generate_scoped(model, batch, order, key, sampling_args, stops, pad_id, max_new_tokens=max_new_tokens,
                                cache_len=cache_len, greedy=greedy, with_logits=with_logits)


def _generate_scoped(model, batch: dict, order, key, sampling_args, stops, pad_id, *, max_new_tokens: int,
                     cache_len: int, greedy: bool, with_logits: bool):
    def rows(x):  # per-row state: rows over the batch axes on a mesh (a no-op on one device)
        return part.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    def pick(logits, key):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else _sample(logits, key, *sampling_args)
        return rows(tok)

    logits, cache = prefill(model, batch, cache_len, order)
    b, n = logits.shape[0], max_new_tokens
    tok = pick(logits, jax.random.fold_in(key, 0))
    out = rows(rows(jnp.full((b, n), pad_id, jnp.int32)).at[:, 0].set(tok))
    all_logits = (rows(rows(jnp.zeros((b, n, logits.shape[-1]), jnp.float32)).at[:, 0].set(logits))
                  if with_logits else None)
    done = rows(jnp.isin(tok, stops))
    lengths = rows(jnp.ones((b,), jnp.int32))

    def cond(state):
        i, _, done, *_ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, out, done, lengths, cache, all_logits = state
        logits, cache = decode_step(model, out[:, i - 1], cache)
        tok = rows(jnp.where(done, pad_id, pick(logits, jax.random.fold_in(key, i))))
        out = rows(jax.lax.dynamic_update_slice(out, tok[:, None], (0, i)))
        if all_logits is not None:
            all_logits = rows(jax.lax.dynamic_update_slice(all_logits, logits[:, None], (0, i, 0)))
        lengths = rows(lengths + (~done).astype(jnp.int32))
        done = rows(done | jnp.isin(tok, stops))
        return i + 1, out, done, lengths, cache, all_logits

    state = (jnp.asarray(1, jnp.int32), out, done, lengths, cache, all_logits)
    _, out, _, lengths, _, all_logits = jax.lax.while_loop(cond, body, state)
    return out, lengths, all_logits


_COMPILED: dict = {}


def _generate_fn(graphdef, **static):
    """The jitted generation of one model structure and static settings, made once per process. (A multimodal
    model's graphdef holds its config's dicts, so it cannot be a static jit argument; its repr is the key.)"""
    key = (repr(graphdef), tuple(sorted(static.items())))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(lambda state, batch, *args: _generate(nnx.merge(graphdef, state), batch, *args,
                                                                       **static))
    return _COMPILED[key]


def _layout(model, state):
    """The mesh the model's arrays are laid out on (the sharded path), or None (one device: the one-device path).

    Refused, naming what is wrong: a one-device model called under a mesh, arrays on several meshes or laid out
    without a mesh, a call under another mesh than the model's, a mesh whose axes are not Explicit, a model without
    logical rules (a bare LLM or a MultimodalModel not built by build.create_model), and the layouts generation does
    not support (pipeline > 1, expert > 1)."""
    ambient = jax.sharding.get_abstract_mesh()
    ambient = None if ambient is None or ambient.empty else ambient
    arrays = [x for x in jax.tree.leaves(state) if hasattr(x, "sharding")]
    spread = [x for x in arrays if len(x.sharding.device_set) > 1]
    if not spread:
        if ambient is not None and ambient.size > 1:
            raise ValueError(f"the model's arrays are on one device but generate was called under a mesh of "
                             f"{ambient.size} devices ({dict(ambient.shape)}): call it outside jax.set_mesh "
                             f"(mllm_jax.train.workdir.outside_mesh), or give the model laid out on that mesh")
        return None
    meshes = {x.sharding.mesh for x in spread if isinstance(x.sharding, jax.sharding.NamedSharding)}
    if len(meshes) != 1 or any(not isinstance(x.sharding, jax.sharding.NamedSharding) for x in spread):
        kinds = sorted({f"{type(x.sharding).__name__} over {len(x.sharding.device_set)} devices" for x in spread})
        raise ValueError(f"generate takes a model on one device or laid out on one mesh (NamedSharding); its "
                         f"arrays lie on {len(meshes)} meshes ({kinds})")
    (mesh,) = meshes
    if ambient is not None and (ambient.axis_names, ambient.axis_sizes) != (mesh.axis_names, mesh.axis_sizes):
        raise ValueError(f"generate was called under a mesh {dict(ambient.shape)} but the model's arrays lie on a mesh "
                         f"{dict(mesh.shape)}: call it under the model's mesh or outside any")
    if any(t != jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        raise ValueError(f"sharded generation needs a mesh of Explicit axes (parallel.mesh.make_mesh); the model's "
                         f"mesh {dict(mesh.shape)} has axis types {mesh.axis_types}")
    unsupported = {a: mesh.shape[a] for a in ("pipeline", "expert") if mesh.shape.get(a, 1) > 1}
    if unsupported:
        raise ValueError(f"sharded generation supports the data, fsdp, tensor and context axes; the model's mesh has "
                         f"{unsupported} (pipeline stages and expert parallelism are not implemented for "
                         f"generation): copy the model onto one device (mllm_jax.train.workdir.on_one_device) or "
                         f"re-lay it out without those axes")
    if not isinstance(model, MultimodalModel) or model.rule_table is None:
        raise ValueError(f"a model laid out over {mesh.size} devices needs its logical rules to generate: give the "
                         f"MultimodalModel built by mllm_jax.build.create_model (rule_table set); got "
                         f"{type(model).__name__}" + ("" if isinstance(model, LLM) else " with rule_table=None"))
    return mesh


def runs_sharded(model) -> bool:
    """Whether ``generate`` runs ``model`` where it lies, laid out over several devices (the sharded path): its arrays
    on one mesh of a supported layout (data, fsdp, tensor, context), called outside any mesh or under that one."""
    try:
        return _layout(model, nnx.state(model)) is not None
    except ValueError:  # _layout's refusals: one device under a mesh, or a layout the sharded path does not support
        return False


def generate(model, batch: dict, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             stop_tokens=(), pad_id: int = 0, cache_len: int | None = None, return_logits: bool = False,
             context_config: ContextConfig | None = None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens after each row's prompt (module docstring). ``cache_len``: the static
    cache length (default: the longest prompt + max_new_tokens); a prompt that does not fit with max_new_tokens is
    refused naming both numbers. Runs wherever the model's arrays are: one device, or a mesh of a supported training
    layout (module docstring; mllm_jax.train.workdir restores a checkpoint onto one device). ``context_config``: on a
    mesh with `context` > 1, the planner's mode and block for the prompt's context-parallel prefill (the run's
    ParallelConfig.context_config; None: ContextConfig()); the attention method is the model's own."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    llm = _llm(model)
    if not isinstance(model, LLM):
        full = dict(batch)
        full.setdefault("labels", np.full(np.shape(batch["input_ids"]), IGNORE, np.int32))
        check_batch(jax.device_get(full), model.config)  # placeholders vs features, vocabulary, shapes
    n = prompt_lengths(batch)
    longest = int(n.max())
    need = longest + max_new_tokens
    if cache_len is None:
        cache_len = need
    if need > cache_len:
        row = int(np.argmax(n))
        raise ValueError(f"prompt of row {row} has {longest} tokens; with max_new_tokens={max_new_tokens} it needs "
                         f"{need} cache slots but the cache holds cache_len={cache_len}")
    left = left_align(batch)
    vocab = llm.config.vocab_size
    bad = [t for t in stop_tokens if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"stop_tokens {bad} are outside the vocabulary [0, {vocab})")
    graphdef, state = nnx.split(model)
    mesh = _layout(model, state)
    fn = _generate_fn(graphdef, max_new_tokens=max_new_tokens, cache_len=cache_len,
                      greedy=sampling.temperature == 0.0, with_logits=return_logits)
    if mesh is None:  # one device
        stops = jnp.asarray([int(t) for t in stop_tokens] or [-1], jnp.int32)  # -1: no token stops
        out, lengths, logits = fn(state, left, None, jax.random.PRNGKey(sampling.seed), _sampling_args(sampling),
                                  stops, jnp.int32(pad_id))
    else:  # the training layouts: rows as placement lays out an eval batch, parameters in their storage
        from mllm_jax.data.placement import put_batch

        order = None
        if mesh.shape["context"] > 1:  # as training: the prompt permuted by a context plan, its sequence sharded
            left, order = context_permute(left, mesh.shape["context"], context_config or ContextConfig(),
                                          model.config)
        with jax.set_mesh(mesh):
            placed = put_batch(left, mesh, leading=0, rule_table=model.rule_table)
            stops = jnp.asarray([int(t) for t in stop_tokens] or [-1], jnp.int32)
            out, lengths, logits = fn(state, placed, order, jax.random.PRNGKey(sampling.seed),
                                      _sampling_args(sampling), stops, jnp.int32(pad_id))
    return GenerateOutput(np.asarray(out), np.asarray(lengths), None if logits is None else np.asarray(logits))
