"""One decoder-only LLM covering Llama, Qwen2, Mistral and Gemma 1/2 by configuration (LLMConfig).

The decoder layers are stacked on a leading ``layers`` axis and applied with ``lax.scan`` (compile time independent of
depth). A layer is the pure function ``decoder_layer(params, h, meta, ...)``; ``apply_decoder_layers`` runs any
contiguous slice of the stack. The pipelined step runs the same pieces: ``LLM.stage_layer`` (one layer of the stack
with its rotary tables and window) and ``head_loss`` (final norm, head, cross entropy) on ``LLM.head_params``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.kernels.meta import TokenMeta
from mllm_jax import layers as L
from mllm_jax import moe as moe_lib
from mllm_jax import partitioning as part
from mllm_jax.config import LLMConfig, LoRAConfig, RunSettings
from mllm_jax.loss import chunked_cross_entropy

Group = L.Group
LLM_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def layer_window(cfg: LLMConfig, i: int) -> int | None:
    """Sliding window of layer i (None = global attention)."""
    if cfg.sliding_window is None:
        return None
    if cfg.sliding_window_pattern and (i + 1) % cfg.sliding_window_pattern == 0:
        return None
    return cfg.sliding_window


def decoder_layer(p: dict, h_BSD, meta: TokenMeta, rope, cfg: LLMConfig, run: RunSettings, window, *, mask=None):
    """One pre-norm decoder layer on already-gathered parameters (a pure function). ``mask``: the dense [B, S, S]
    attention rule for this layer's window when the caller built it once for all layers (kernels.takes_mask)."""
    return decoder_layer_with_aux(p, h_BSD, meta, rope, cfg, run, window, mask=mask)[0]


def decoder_layer_with_aux(p: dict, h_BSD, meta: TokenMeta, rope, cfg: LLMConfig, run: RunSettings, window, *,
                           mask=None):
    """``decoder_layer`` and its router statistics: (h, moe.MoEStats) on an MoE layer, (h, None) on a dense one."""
    x = L.rms_norm(p["attn_norm"], h_BSD, cfg.norm_eps, plus_one=cfg.norm_scale_plus_one)
    a = L.self_attention(
        p["attn"], x, meta, rope=rope, lora_scale=run.lora_scale, impl=run.attention_impl, scale=attention_scale(cfg),
        window=window, softcap=cfg.attn_logit_softcap, span_isolated=run.span_isolated,
        context_method=run.context_method, mask=mask, qk_norm_eps=cfg.norm_eps if cfg.qk_norm else None,
        qk_norm_plus_one=cfg.norm_scale_plus_one,
    )
    return mlp_sublayer_with_aux(p, attention_residual(p, h_BSD, a, cfg), cfg, run)


def attention_scale(cfg: LLMConfig) -> float | None:
    """Softmax scale (None: 1/sqrt(head_dim)); Gemma 2 uses 1/sqrt(query_pre_attn_scalar)."""
    return cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None


def attention_residual(p: dict, h_BSD, attn_out_BSD, cfg: LLMConfig):
    """h + (post-norm of) the attention output: the attention half of a decoder layer after the attention itself
    (shared by training and the cached decode, which computes the attention differently)."""
    if cfg.post_norms:
        attn_out_BSD = L.rms_norm(p["post_attn_norm"], attn_out_BSD, cfg.norm_eps, plus_one=cfg.norm_scale_plus_one)
    return h_BSD + attn_out_BSD


def mlp_sublayer(p: dict, h_BSD, cfg: LLMConfig, run: RunSettings):
    """The MLP half of a decoder layer: h + MLP(norm(h)) (Gemma 2: post-norm on the MLP output). An MoE layer's
    parameters (``p["moe"]``) run the mixture of experts; its router statistics are dropped here (see
    ``mlp_sublayer_with_aux``)."""
    return mlp_sublayer_with_aux(p, h_BSD, cfg, run)[0]


def mlp_sublayer_with_aux(p: dict, h_BSD, cfg: LLMConfig, run: RunSettings):
    """``mlp_sublayer`` and the router statistics of an MoE layer: (h, moe.MoEStats), or (h, None) when dense."""
    plus_one = cfg.norm_scale_plus_one
    x = L.rms_norm(p["mlp_norm"], h_BSD, cfg.norm_eps, plus_one=plus_one)
    stats = None
    if "moe" in p:
        m, stats = moe_lib.moe_mlp(p["moe"], x, cfg, run)
    else:
        m = L.gated_mlp(p["mlp"], x, cfg.activation, lora_scale=run.lora_scale)
    if cfg.post_norms:
        m = L.rms_norm(p["post_mlp_norm"], m, cfg.norm_eps, plus_one=plus_one)
    return part.constrain(h_BSD + m, ("batch", "length", "act_embed")), stats


def rope_frequencies(cfg: LLMConfig, *, local: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2] of a global layer, or of a sliding-window layer (``local``: Gemma 3's
    own base, unscaled, when ``rope_local_theta`` is set)."""
    hd = cfg.resolved_head_dim
    if local and cfg.rope_local_theta is not None:
        return L.rope_inv_freq(hd, cfg.rope_local_theta)
    inv = L.rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
    return (inv / np.float32(cfg.rope_linear_factor)).astype(np.float32)


def rope_tables(cfg: LLMConfig, positions_BS, rope_positions_BS3=None, *, local: bool = False):
    """RoPE (cos, sin) of the tokens' global positions: computed once per forward, shared by the layers of one kind.

    With ``mrope_section`` (Qwen2-VL) the angles come from ``rope_positions_BS3`` [B, S, 3] (temporal, height, width);
    without them every axis is the causal position (text-only: exactly 1-D RoPE)."""
    inv_freq = rope_frequencies(cfg, local=local)
    if cfg.mrope_section is None:
        return L.rope_cos_sin(positions_BS, inv_freq)
    if rope_positions_BS3 is None:
        rope_positions_BS3 = jnp.broadcast_to(jnp.asarray(positions_BS)[..., None], tuple(positions_BS.shape) + (3,))
    return L.mrope_cos_sin(rope_positions_BS3, inv_freq, cfg.mrope_section)


def layer_ropes(cfg: LLMConfig, windows, positions_BS, rope_positions_BS3=None) -> dict:
    """window -> the (cos, sin) its layers rotate with: one table for every layer, or (Gemma 3) one for the local
    (sliding-window) layers and one for the global ones."""
    split = cfg.rope_local_theta is not None
    tables = {}
    for local in sorted({split and w is not None for w in windows}):
        tables[local] = rope_tables(cfg, positions_BS, rope_positions_BS3, local=local)
    return {w: tables[split and w is not None] for w in windows}


def stored_decoder_layer(p: dict, names: dict, h_BSD, meta: TokenMeta, rope, cfg: LLMConfig, run: RunSettings,
                         window, *, mask=None):
    """One decoder layer on its stored parameters (one layer sliced out of the stack): gathered, cast, applied."""
    return stored_decoder_layer_with_aux(p, names, h_BSD, meta, rope, cfg, run, window, mask=mask)[0]


def use_layer_params(p: dict, names: dict, run: RunSettings) -> dict:
    """One stored layer's parameters gathered and cast for compute (an MoE layer's experts stay expert-sharded)."""
    dtype = L.dtype_of(run.dtype)
    w = L.use_params({k: v for k, v in p.items() if k != "moe"}, {k: names[k] for k in p if k != "moe"},
                     dtype, drop_leading=True)
    if "moe" in p:
        w["moe"] = moe_lib.use_moe_params(p["moe"], names["moe"], dtype, drop_leading=True)
    return w


def stored_decoder_layer_with_aux(p: dict, names: dict, h_BSD, meta: TokenMeta, rope, cfg: LLMConfig,
                                  run: RunSettings, window, *, mask=None):
    return decoder_layer_with_aux(use_layer_params(p, names, run), h_BSD, meta, rope, cfg, run, window, mask=mask)


def _layer_slice(params: dict, kinds: list, i: int, j: int) -> dict:
    """Layers i .. j-1 of a slice whose shared parameters are stacked per layer and whose MLPs are stacked per kind
    (``mlp`` over the dense layers, ``moe`` over the MoE layers, in layer order); ``kinds[l]``: layer l is MoE."""
    out = {k: jax.tree.map(lambda x: x[i:j], v) for k, v in params.items() if k not in ("mlp", "moe")}
    for key, want in (("mlp", False), ("moe", True)):
        if key in params:
            a = sum(1 for k in kinds[:i] if k == want)
            b = a + sum(1 for k in kinds[i:j] if k == want)
            if b > a:
                out[key] = jax.tree.map(lambda x: x[a:b], params[key])
    return out


def apply_decoder_layers(params: dict, names: dict, h_BSD, meta: TokenMeta, cfg: LLMConfig, run: RunSettings,
                         *, first_layer: int = 0, rope_positions=None):
    """Run a contiguous slice of stacked decoder layers: params [n, ...] are layers first_layer .. first_layer + n - 1.

    A pure function of (params, h, meta): ``names`` are the parameters' logical names (static), ``first_layer`` fixes
    which layers have a sliding window. Runs of layers with the same window are one ``lax.scan`` each; alternating
    windows (Gemma 2) scan over groups of ``sliding_window_pattern`` layers. ``rope_positions`` [B, S, 3]: the M-RoPE
    positions (``LLMConfig.mrope_section``; None: the causal positions on every axis).
    """
    return apply_decoder_layers_with_aux(params, names, h_BSD, meta, cfg, run, first_layer=first_layer,
                                         rope_positions=rope_positions)[0]


def apply_decoder_layers_with_aux(params: dict, names: dict, h_BSD, meta: TokenMeta, cfg: LLMConfig,
                                  run: RunSettings, *, first_layer: int = 0, rope_positions=None):
    """``apply_decoder_layers`` and the MoE layers' router statistics stacked in layer order (moe.MoEStats with a
    leading [n_moe_layers] axis; None without MoE layers): scan outputs of the layer scans.

    Runs of layers of the same kind (dense / MoE) and window are one scan each; a slice of one kind with Gemma 2's
    alternating windows scans groups of ``sliding_window_pattern`` layers."""
    n = params["attn_norm"]["scale"].shape[0]
    params = jax.tree.map(part.unshard_leading, params)  # scan slices the layers axis: it must be whole here
    windows = [layer_window(cfg, first_layer + i) for i in range(n)]
    ropes = layer_ropes(cfg, set(windows), meta.positions, rope_positions)
    kinds = [cfg.is_moe_layer(first_layer + i) for i in range(n)]
    masks = layer_masks(meta, set(windows), h_BSD.shape[1], run)

    def group_body(group_windows):
        def body(p_group, h):
            stats = []
            for j, w in enumerate(group_windows):
                p = p_group if len(group_windows) == 1 else jax.tree.map(lambda a, j=j: a[j], p_group)
                h, st = stored_decoder_layer_with_aux(p, names, h, meta, ropes[w], cfg, run, w, mask=masks.get(w))
                stats.append(st)
            if stats[0] is None:
                return h, None
            return h, moe_lib.MoEStats(*(jnp.stack(xs) for xs in zip(*stats)))

        return body

    def scan(group_windows, p):
        h_out, st = L.scan_layers(group_body(group_windows), h, p, run.remat, run.layer_loop, has_aux=True)
        if st is not None:  # [scan steps, group size, ...] -> [layers, ...]
            st = moe_lib.MoEStats(*(x.reshape((-1,) + x.shape[2:]) for x in st))
        return h_out, st

    h = h_BSD.astype(L.dtype_of(run.dtype))
    collected = []
    if len(set(kinds)) > 1:  # a mixed MoE / dense slice: each run of one kind and window is one scan
        i = 0
        while i < n:
            j = i + 1
            while j < n and (kinds[j], windows[j]) == (kinds[i], windows[i]):
                j += 1
            h, st = scan((windows[i],), _layer_slice(params, kinds, i, j))
            collected.append(st)
            i = j
        return h, moe_lib.combine(collected)
    if len(set(windows)) == 1:
        h, st = scan((windows[0],), params)
        return h, st
    g = cfg.sliding_window_pattern
    start = (-first_layer) % g  # layers before the first aligned group run one by one
    n_groups = (n - start) // g
    sl = lambda a, b: jax.tree.map(lambda x: x[a:b], params)  # noqa: E731
    for i in range(start):
        h, st = scan((windows[i],), sl(i, i + 1))
        collected.append(st)
    if n_groups:
        grouped = jax.tree.map(lambda x: x.reshape((n_groups, g) + x.shape[1:]), sl(start, start + n_groups * g))
        h, st = scan(tuple(windows[start:start + g]), grouped)
        collected.append(st)
    for i in range(start + n_groups * g, n):
        h, st = scan((windows[i],), sl(i, i + 1))
        collected.append(st)
    return h, moe_lib.combine(collected)


def layer_masks(meta: TokenMeta, windows: set, length: int, run: RunSettings) -> dict:
    """window -> dense [B, S, S] mask, built once before the layer scan when attention takes the dense head-major
    path (so no layer recomputes the rule from the metadata, forward or backward); {} otherwise."""
    from mllm_jax import kernels

    if not kernels.takes_mask(run.attention_impl, length):
        return {}
    return {w: kernels.mask(meta, meta, window=w, span_isolated=run.span_isolated) for w in windows}


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Embedder(nnx.Module):
    """The token embedding table [V, D] (path embed/embedding); calling it embeds ids: ``llm.embed(ids)``."""

    def __init__(self, embedding: nnx.Param, config: LLMConfig, dtype: str):
        self.embedding = embedding
        self.config = config
        self.dtype = dtype

    def __call__(self, ids_BS):
        cfg = self.config
        if _is_concrete(ids_BS):
            ids_np = np.asarray(ids_BS)
            if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= cfg.vocab_size):
                raise ValueError(
                    f"token ids must be in [0, {cfg.vocab_size}) (vocab_size); got min {ids_np.min()}, "
                    f"max {ids_np.max()}"
                )
        dtype = L.dtype_of(self.dtype)
        table = part.gathered(self.embedding[...], ("vocab", "embed")).astype(dtype)
        ids_BS = jnp.asarray(ids_BS, jnp.int32)
        e = part.take_rows(table, ids_BS, ("batch", "length", "act_embed"))
        if cfg.embed_scale:
            e = e * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        return e


class LLM(nnx.Module):
    """Decoder-only LLM. ``llm(input_ids, meta)`` or ``llm(meta=meta, inputs_embeds=e)`` -> logits [B, S, V].

    Parameters: embed/embedding [V, D]; layers/{attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{gate,up,down}} stacked
    [L, ...] (Gemma 2 adds post_attn_norm, post_mlp_norm); final_norm; lm_head/kernel [D, V] unless tied.
    """

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None,
                 run: RunSettings = RunSettings()):
        cfg = config
        self.config = cfg
        if cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.n_kv_heads})")
        if cfg.sliding_window_pattern < 0:
            raise ValueError(f"sliding_window_pattern must be >= 0; got {cfg.sliding_window_pattern}")
        validate_rope(cfg)
        moe_lib.validate(cfg)
        lora_rank = None
        if lora is not None:
            known = LLM_LORA_TARGETS + ("fc1", "fc2")  # fc1/fc2 name encoder projections; the LLM skips them
            bad = [t for t in lora.targets if t not in known]
            if bad:
                raise ValueError(f"LoRA targets {bad} unknown; choose from {known}")
            lora_rank = lora.rank
            run = dataclasses.replace(run, lora_scale=lora.alpha / lora.rank)
        self.run = run
        targets = set(lora.targets) if lora is not None else set()
        d, hd, nl = cfg.d_model, cfg.resolved_head_dim, cfg.n_layers
        std = 0.02

        def lin(name, ins, outs, in_names, out_names, bias=False, stack=nl):
            return L.Linear(ins, outs, in_names, out_names, rngs=rngs, bias=bias, stack=stack, init_std=std,
                            lora_rank=lora_rank if name in targets else None)

        emb = std * jax.random.normal(rngs.params(), (cfg.vocab_size, d), jnp.float32)
        self.embed = Embedder(part.param(emb, ("vocab", "embed")), cfg, run.dtype)
        norm_init = 0.0 if cfg.norm_scale_plus_one else 1.0
        norm = lambda: L.Norm(d, bias=False, stack=nl, init=norm_init)  # noqa: E731
        attn = Group(
            q=lin("q", (d,), (cfg.n_heads, hd), ("embed",), ("heads", "head_dim"), cfg.qkv_bias),
            k=lin("k", (d,), (cfg.n_kv_heads, hd), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias),
            v=lin("v", (d,), (cfg.n_kv_heads, hd), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias),
            o=lin("o", (cfg.n_heads, hd), (d,), ("heads", "head_dim"), ("embed",)),
        )
        if cfg.qk_norm:
            attn.q_norm = L.Norm(hd, bias=False, stack=nl, init=norm_init, names=("head_dim",))
            attn.k_norm = L.Norm(hd, bias=False, stack=nl, init=norm_init, names=("head_dim",))

        def dense_mlp(stack, f=cfg.d_ff, names=("mlp",)):
            return Group(
                gate=lin("gate", (d,), (f,), ("embed",), names, stack=stack),
                up=lin("up", (d,), (f,), ("embed",), names, stack=stack),
                down=lin("down", (f,), (d,), names, ("embed",), stack=stack),
            )

        # MLPs are stacked per kind: ``mlp`` over the dense layers, ``moe`` over the MoE layers (layer order).
        n_moe = len(cfg.moe_layers)
        mlps = {}
        if nl - n_moe:
            mlps["mlp"] = dense_mlp(nl - n_moe)
        if n_moe:
            e, f = cfg.n_experts, cfg.resolved_moe_d_ff

            def expert(ins, outs, in_names, out_names):
                return L.Linear(ins, outs, in_names, out_names, rngs=rngs, bias=False, stack=n_moe, init_std=std)

            moe = Group(
                router=expert((d,), (e,), ("embed",), ("moe_router",)),
                experts=Group(gate=expert((e, d), (f,), ("experts", "embed"), ("expert_mlp",)),
                              up=expert((e, d), (f,), ("experts", "embed"), ("expert_mlp",)),
                              down=expert((e, f), (d,), ("experts", "expert_mlp"), ("embed",))),
            )
            if cfg.shared_expert_d_ff:
                moe.shared = dense_mlp(n_moe, cfg.shared_expert_d_ff)
                if cfg.shared_expert_gate:
                    moe.shared_gate = expert((d,), (1,), ("embed",), ("moe_router",))
            mlps["moe"] = moe
        extra = dict(post_attn_norm=norm(), post_mlp_norm=norm()) if cfg.post_norms else {}
        self.layers = Group(attn_norm=norm(), attn=attn, mlp_norm=norm(), **mlps, **extra)
        self.final_norm = L.Norm(d, bias=False, init=norm_init)
        if not cfg.tie_embeddings:
            self.lm_head = L.Linear((d,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs, bias=False,
                                    init_std=std)

    # ---- pieces

    def embed_tokens(self, ids_BS):
        """Token embeddings [B, S, D] in the compute dtype (Gemma: times sqrt(d_model)); same as ``llm.embed(ids)``."""
        return self.embed(ids_BS)

    def layer_params(self) -> tuple[dict, dict]:
        """(stacked parameter arrays [L, ...], their logical names): the inputs of ``apply_layers``."""
        return L.module_params(self.layers)

    def apply_layers(self, layer_params: dict, h_BSD, meta: TokenMeta, *, first_layer: int = 0, rope_positions=None):
        """Pure: run the stacked layers ``layer_params`` (a contiguous slice starting at ``first_layer``) on h."""
        _, names = self.layer_params()
        return apply_decoder_layers(layer_params, names, h_BSD, meta, self.config, self.run, first_layer=first_layer,
                                    rope_positions=rope_positions)

    def stage_layer(self):
        """(layer_fn(p, h, meta), window_codes): one decoder layer anywhere in the stack, as a pipeline stage runs it.

        p = {"weights": one layer's stored parameters, "window": its window code}: layers with different attention
        windows (Gemma 2's alternating local / global) share the stack, and the window is chosen per layer by
        ``lax.switch`` on the code (real control flow inside shard_map). window_codes: [n_layers] float32 (a float,
        so the codes ride with the weights through the pipeline's vjps), None when every layer has the same window.
        """
        cfg, run = self.config, self.run
        _, names = self.layer_params()
        windows = sorted({layer_window(cfg, i) for i in range(cfg.n_layers)}, key=lambda w: -1 if w is None else w)

        n_moe = len(cfg.moe_layers)
        if 0 < n_moe < cfg.n_layers:
            raise ValueError(f"a pipeline stage stacks one layer kind; LLMConfig has MoE layers {cfg.moe_layers} of "
                             f"{cfg.n_layers}")

        def one(p, h_BSD, meta, rope, w, moe_weight):
            h, stats = stored_decoder_layer_with_aux(p["weights"], names, h_BSD, meta, rope, cfg, run, w)
            if stats is not None and moe_weight is not None:
                # The layer's router losses reach the objective through the backward pass only.
                h = moe_lib.with_loss_gradient(h, moe_lib.layer_penalty(stats, cfg), moe_weight)
            return h

        def layer_fn(p, h_BSD, meta: TokenMeta, moe_weight=None, rope_positions=None):
            """``moe_weight``: this microbatch's weight of the MoE layers' penalty in the objective (label count
            / global label count / MoE layers), or None to leave the router losses out. ``rope_positions``: the
            M-RoPE positions [B, S, 3] (None: the causal positions)."""
            ropes = layer_ropes(cfg, set(windows), meta.positions, rope_positions)
            branches = [lambda w=w: one(p, h_BSD, meta, ropes[w], w, moe_weight) for w in windows]
            if len(branches) == 1:
                return branches[0]()
            return jax.lax.switch(jax.lax.stop_gradient(p["window"]).astype(jnp.int32), branches)

        if len(windows) == 1:
            return layer_fn, None
        return layer_fn, jnp.asarray([windows.index(layer_window(cfg, i)) for i in range(cfg.n_layers)], jnp.float32)

    def head_params(self) -> dict:
        """Final norm and output projection (the tied embedding when the LLM ties them) as one pure dict, gathered
        for compute: FSDP-gathered and otherwise in their storage layout (a vocabulary sharded over `tensor` stays
        sharded). The input of ``final_norm``, ``head_matrix`` and ``head_loss``."""
        tied = self.config.tie_embeddings
        parts = {"final_norm": self.final_norm, "embed" if tied else "lm_head": self.embed if tied else self.lm_head}
        return {k: L.params_for_compute(m, jnp.float32) for k, m in parts.items()}

    def final(self, h_BSD):
        return final_norm(L.params_for_compute(self.final_norm, jnp.float32), h_BSD, self.config)

    def hidden(self, embeds_BSD, meta: TokenMeta, rope_positions=None):
        """Decoder layers + final norm: [B, S, D] -> [B, S, D]. ``rope_positions`` [B, S, 3]: M-RoPE positions
        (only with ``LLMConfig.mrope_section``; None: the causal positions on every axis)."""
        return self.hidden_with_aux(embeds_BSD, meta, rope_positions)[0]

    def hidden_with_aux(self, embeds_BSD, meta: TokenMeta, rope_positions=None):
        """(``hidden``, the MoE layers' router statistics stacked [n_moe_layers, ...] or None)."""
        meta = check_meta(meta, embeds_BSD.shape[:2])
        rope_positions = check_rope_positions(self.config, rope_positions, embeds_BSD.shape[:2])
        values, names = self.layer_params()
        h, stats = apply_decoder_layers_with_aux(values, names, embeds_BSD, meta, self.config, self.run,
                                                 rope_positions=rope_positions)
        return self.final(h), stats

    def head_weight(self):
        """The output projection as [D, V] (the tied embedding transposed, or lm_head), gathered for compute."""
        return head_matrix(self.head_params(), self.config)

    def logits(self, hidden_BSD):
        """[B, S, D] -> [B, S, V] float32 (Gemma 2: final softcap)."""
        w = self.head_weight().astype(hidden_BSD.dtype)
        return logits_from_hidden(hidden_BSD, w, self.config.final_logit_softcap)

    def __call__(self, input_ids=None, meta: TokenMeta | None = None, *, inputs_embeds=None, rope_positions=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if meta is None:
            meta = TokenMeta.causal(*inputs_embeds.shape[:2], xp=jnp)
        return self.logits(self.hidden(inputs_embeds, meta, rope_positions))


def logits_from_hidden(h_BSD, w_DV, softcap):
    y = L.project("bsd,dv->bsv", h_BSD, w_DV, ("batch", "length", "vocab"), preferred_element_type=jnp.float32)
    y = y.astype(jnp.float32)
    if softcap:
        y = softcap * jnp.tanh(y / softcap)
    return y


def final_norm(p_norm: dict, h_BSD, cfg: LLMConfig):
    """The final RMS norm on gathered parameters {"scale"}: the last layer's output -> the head's input."""
    return L.rms_norm(p_norm, h_BSD, cfg.norm_eps, plus_one=cfg.norm_scale_plus_one)


def head_matrix(head_params: dict, cfg: LLMConfig):
    """The output projection [D, V] from ``LLM.head_params()``."""
    return head_params["embed"]["embedding"].T if cfg.tie_embeddings else head_params["lm_head"]["kernel"]


def token_loss(head_params: dict, h_final_BSD, labels_BS, cfg: LLMConfig, *, chunk: int | None = None):
    """Logits and chunked cross entropy of the final-normed hidden states: (sum of token losses, label count)."""
    w = head_matrix(head_params, cfg).astype(h_final_BSD.dtype)
    return chunked_cross_entropy(h_final_BSD, lambda hh: logits_from_hidden(hh, w, cfg.final_logit_softcap),
                                 labels_BS, chunk=chunk, vocab=cfg.vocab_size)


def head_loss(head_params: dict, h_BSD, labels_BS, cfg: LLMConfig, *, chunk: int | None = None):
    """Final norm, then ``token_loss``, of the last layer's output: a pure function of ``LLM.head_params()`` (what
    the pipeline's last stage runs)."""
    return token_loss(head_params, final_norm(head_params["final_norm"], h_BSD, cfg), labels_BS, cfg, chunk=chunk)


def check_meta(meta: TokenMeta, want: tuple) -> TokenMeta:
    """Refuse metadata whose arrays do not have the tokens' shape [B, S] (before anything is traced)."""
    if not isinstance(meta, TokenMeta):
        meta = TokenMeta(*meta)
    shapes = {f: tuple(np.shape(getattr(meta, f))) for f in meta._fields}
    bad = {f: s for f, s in shapes.items() if s != tuple(want)}
    if bad:
        raise ValueError(f"token metadata must have the tokens' shape {tuple(want)}; got {bad}")
    return TokenMeta(*(jnp.asarray(a, jnp.int32) for a in meta))


def validate_rope(cfg: LLMConfig) -> None:
    """Refuse RoPE options that do not fit together, naming the values."""
    half = cfg.resolved_head_dim // 2
    if cfg.mrope_section is not None and (sum(cfg.mrope_section) != half or min(cfg.mrope_section) < 0):
        raise ValueError(f"mrope_section {tuple(cfg.mrope_section)} must be non-negative sizes summing to head_dim / 2 "
                         f"= {half}")
    if cfg.rope_linear_factor <= 0:
        raise ValueError(f"rope_linear_factor must be > 0; got {cfg.rope_linear_factor}")
    if cfg.rope_linear_factor != 1.0 and cfg.rope_scaling is not None:
        raise ValueError(f"rope_linear_factor={cfg.rope_linear_factor} and llama3 rope_scaling are two RoPE scalings; "
                         f"give one")


def check_rope_positions(cfg: LLMConfig, rope_positions, want: tuple):
    """M-RoPE positions as int32 [B, S, 3], refused when given to an LLM without ``mrope_section`` or in another
    shape; None stays None (the causal positions stand in)."""
    if rope_positions is None:
        return None
    if cfg.mrope_section is None:
        raise ValueError("rope_positions were given but LLMConfig.mrope_section is None (1-D RoPE); set mrope_section "
                         "or leave rope_positions out")
    if tuple(np.shape(rope_positions)) != tuple(want) + (3,):
        raise ValueError(f"rope_positions must be [B, S, 3] = {tuple(want) + (3,)}; got "
                         f"{tuple(np.shape(rope_positions))}")
    return jnp.asarray(rope_positions, jnp.int32)
