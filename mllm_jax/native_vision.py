"""The Qwen2-VL / Qwen2.5-VL vision tower on packed patch rows (docs/native_resolution.md), following transformers'
Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel up to (not including) the merger.

Input: the batch dict {patches [R, P, C*tp*p*p], grid [R, P, 3] (t, h, w), segment_ids [R, P]}; output: per-patch
features [R, P, D] (the projector kind "patch_merger" merges them).

- patch_embed: HF's Conv3d with stride = kernel is a linear map of each flattened patch: kernel [C, tp, p, p, D].
- 2-D rotary embedding: head_dim/4 frequencies (theta ** (-2j / (head_dim/2))) at the patch's h and at its w,
  concatenated, over the whole head (HF VisionRotaryEmbedding).
- blocks: qwen2_vl: LayerNorm, fused qkv (bias), o, MLP fc1-act-fc2; qwen2_5_vl: RMSNorm, the same attention, gated
  MLP gate/up/down (bias).
- attention through kernels.attention with TokenMeta ids computed from each patch's (t, h, w), never a permutation:
  HF attends within each temporal slice of an instance (cu_seqlens has one segment per (instance, t)); Qwen2.5-VL's
  window layers within windows of ``window_size // patch_size // merge`` merged units square, anchored at the slice's
  top-left (HF's window_index permutation + cu_window_seqlens, whose attention is the same set of keys per query).
  The packer lays Qwen2.5-VL instances out window-major (data.native_pack), so each window is contiguous and the
  kernels compute only its tiles; any patch order inside a slice gives the same features. Padding (segment 0) sees
  nothing.

Parameters: patch_embed/kernel, layers/{norm1, attn/{qkv, o}, norm2, mlp/{fc1, fc2} | {gate, up, down}} stacked on a
leading ``layers`` axis and run with layers.scan_layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax import kernels
from mllm_jax import layers as L
from mllm_jax import partitioning as part
from mllm_jax.config import NativeVisionConfig, RunSettings
from mllm_jax.kernels.meta import TokenMeta

KINDS = ("qwen2_vl", "qwen2_5_vl")
ACT = ("batch", "length", "act_embed")


def validate(cfg: NativeVisionConfig) -> None:
    if cfg.kind not in KINDS:
        raise ValueError(f"NativeVisionConfig.kind must be one of {KINDS}; got {cfg.kind!r}")
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 4:
        raise ValueError(f"NativeVisionConfig: d_model ({cfg.d_model}) / n_heads ({cfg.n_heads}) must be a head_dim "
                         f"divisible by 4 (the 2-D rotary embedding splits it into h and w halves of rotations)")
    if cfg.patches_per_row % cfg.merge_units:
        raise ValueError(f"NativeVisionConfig.patches_per_row ({cfg.patches_per_row}) must be a multiple of "
                         f"spatial_merge_size**2 ({cfg.merge_units})")
    unit = cfg.patch_size * cfg.spatial_merge_size
    if cfg.window_size and (cfg.window_size % unit or cfg.kind != "qwen2_5_vl"):
        raise ValueError(f"NativeVisionConfig.window_size ({cfg.window_size}) must be a multiple of patch_size * "
                         f"spatial_merge_size ({unit}), and only kind 'qwen2_5_vl' has windows (kind {cfg.kind!r})")
    if cfg.window_size and (cfg.patches_per_row + 1) * windows_across_bound(
            cfg.patches_per_row, cfg.spatial_merge_size, window_units(cfg)) >= 2**31:
        raise ValueError(f"NativeVisionConfig.patches_per_row ({cfg.patches_per_row}) is too large for the int32 "
                         f"window ids of window_size {cfg.window_size} (attention_ids); split the rows")
    bad = [i for i in cfg.full_attention_layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"NativeVisionConfig.full_attention_layers {bad} are not layers of a {cfg.n_layers}-layer "
                         f"tower")


def window_units(cfg: NativeVisionConfig) -> int:
    """Side of an attention window in merged units (HF vit_merger_window_size); 0: no window layers."""
    return cfg.window_size // cfg.spatial_merge_size // cfg.patch_size


def full_layers(cfg: NativeVisionConfig) -> np.ndarray:
    """bool [n_layers]: the layers that attend over the whole temporal slice (all of them without windows)."""
    if not window_units(cfg):
        return np.ones(cfg.n_layers, bool)
    return np.isin(np.arange(cfg.n_layers), np.asarray(cfg.full_attention_layers, np.int32))


def attention_ids(grid_RP3, segment_ids_RP, merge_size: int, window: int):
    """(slice ids, window ids) int32 [R, P]: equal, nonzero ids for the patches that attend to each other; 0 for
    padding. A slice is one temporal index of one instance, a contiguous run of the row (in any patch order); its id
    is 1 + the index of its first patch in the row. A window is the set of patches whose merged unit (h // m, w // m)
    falls in the same ``window``-unit square of the slice (anchored at its top-left); its id is the slice id plus the
    window's raster number in the slice (wh * windows across + ww, the windows across from the slice's largest
    window column, ``run_max``). Everything comes from each patch's own (t, h, w), so any order of the patches inside a slice gives the
    same attention; with the windows contiguous in raster order of windows (``data.native_pack.window_order``) the
    ids increase along the row and a tile of the block map meets only the windows it holds. The slice has at least as
    many patches as windows, so the ids stay inside its own range of the row: unique per row. ``window`` = 0: no
    windows (the window ids are the slice ids)."""
    seg = segment_ids_RP.astype(jnp.int32)
    grid = grid_RP3.astype(jnp.int32)
    t, h, w = grid[..., 0], grid[..., 1], grid[..., 2]
    idx = jnp.arange(seg.shape[1], dtype=jnp.int32)[None]
    valid = seg != 0
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool),
                             (seg[:, 1:] != seg[:, :-1]) | (t[:, 1:] != t[:, :-1])], axis=1)
    start = jax.lax.cummax(jnp.where(valid & first, idx, 0), axis=1)
    slice_ids = jnp.where(valid, start + 1, 0)
    if not window:
        return slice_ids, slice_ids
    wh, ww = h // merge_size // window, w // merge_size // window
    across = run_max(ww, first, windows_across_bound(seg.shape[1], merge_size, window)) + 1
    return slice_ids, jnp.where(valid, slice_ids + wh * across + ww, 0)


def run_max(x_RP, first_RP, bound: int):
    """[R, P]: the largest ``x`` (ints in [0, bound)) of each contiguous run of the row (a run starts where ``first``
    is True), at every position of the run. A running max of run ordinal * bound + x (cummax: earlier runs' keys are
    smaller, so the max restarts at each run), read at the run's last position. int32: (runs + 1) * bound < 2**31
    (``validate`` checks the tower's bound)."""
    p = x_RP.shape[1]
    ordinal = jnp.cumsum(first_RP.astype(jnp.int32), axis=1)
    prefix = jax.lax.cummax(ordinal * bound + x_RP, axis=1) - ordinal * bound
    idx = jnp.arange(p, dtype=jnp.int32)[None]
    last = jnp.concatenate([first_RP[:, 1:], jnp.ones_like(first_RP[:, :1])], axis=1)
    end = jax.lax.cummin(jnp.where(last, idx, p), axis=1, reverse=True)
    return jnp.take_along_axis(prefix, end, axis=1)


def windows_across_bound(patches_per_row: int, merge_size: int, window: int) -> int:
    """More than any window column (w // merge_size // window) of a row of ``patches_per_row`` patches: an instance
    is at least merge_size patches high, so at most patches_per_row / merge_size wide."""
    return (patches_per_row // merge_size) // (merge_size * window) + 1


def rope_cos_sin(grid_RP3, head_dim: int, theta: float):
    """cos, sin [R, P, 1, head_dim]: frequencies at h then at w, the pair repeated (HF recomposition_frequencies)."""
    inv = jnp.asarray(L.rope_inv_freq(head_dim // 2, theta))  # [head_dim / 4]
    pos = grid_RP3[..., 1:].astype(jnp.float32)  # (h, w)
    freqs = (pos[..., :, None] * inv).reshape(*pos.shape[:-1], head_dim // 2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


class NativeVisionLayers(nnx.Module):
    def __init__(self, cfg: NativeVisionConfig, *, rngs: nnx.Rngs):
        d, n, nl = cfg.d_model, cfg.n_heads, cfg.n_layers
        hd = d // n

        def lin(ins, outs, in_names, out_names):
            return L.Linear(ins, outs, in_names, out_names, rngs=rngs, stack=nl)

        rms = cfg.kind == "qwen2_5_vl"
        self.norm1 = L.Norm(d, bias=not rms, stack=nl)
        self.attn = L.Group(qkv=lin((d,), (3, n, hd), ("embed",), (None, "heads", "head_dim")),
                            o=lin((n, hd), (d,), ("heads", "head_dim"), ("embed",)))
        self.norm2 = L.Norm(d, bias=not rms, stack=nl)
        if rms:
            self.mlp = L.Group(gate=lin((d,), (cfg.d_ff,), ("embed",), ("mlp",)),
                               up=lin((d,), (cfg.d_ff,), ("embed",), ("mlp",)),
                               down=lin((cfg.d_ff,), (d,), ("mlp",), ("embed",)))
        else:
            self.mlp = L.Group(fc1=lin((d,), (cfg.d_ff,), ("embed",), ("mlp",)),
                               fc2=lin((cfg.d_ff,), (d,), ("mlp",), ("embed",)))


class NativeVisionEncoder(nnx.Module):
    """{patches, grid, segment_ids} of R packed rows -> per-patch features [R, P, d_model] (module docstring)."""

    def __init__(self, config: NativeVisionConfig, *, rngs: nnx.Rngs, lora_rank: int | None = None,
                 lora_targets: tuple = (), run: RunSettings = RunSettings()):
        validate(config)
        if lora_rank:
            raise ValueError(f"LoRA (rank {lora_rank}, targets {lora_targets}) is not supported on the "
                             f"{config.kind} vision tower; train it fully or freeze it")
        L.check_layer_loop(run.layer_loop)
        self.config, self.run = config, run
        c = config
        self.patch_embed = L.Linear((c.num_channels, c.temporal_patch_size, c.patch_size, c.patch_size),
                                    (c.d_model,), ("channels", "patch", "patch", "patch"), ("embed",), rngs=rngs,
                                    bias=False)
        self.layers = NativeVisionLayers(c, rngs=rngs)

    def check_inputs(self, inputs) -> None:
        c = self.config
        if not isinstance(inputs, dict) or set(inputs) != {"patches", "grid", "segment_ids"}:
            keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(f"native vision inputs must be a dict with keys ['grid', 'patches', 'segment_ids']; "
                             f"got {keys}")
        shape = tuple(inputs["patches"].shape)
        if len(shape) != 3 or shape[2] != c.patch_dim or shape[1] % c.merge_units:
            raise ValueError(f"patches must be [R, P, {c.patch_dim}] (C*tp*p*p) with P a multiple of "
                             f"{c.merge_units}; got shape {shape}")
        want = {"grid": shape[:2] + (3,), "segment_ids": shape[:2]}
        for key, s in want.items():
            if tuple(inputs[key].shape) != s:
                raise ValueError(f"native vision input {key!r} must have shape {s} to match patches {shape}; got "
                                 f"{tuple(inputs[key].shape)}")

    def embed(self, patches_RPK):
        c = self.config
        dtype = L.dtype_of(self.run.dtype)
        r, p = patches_RPK.shape[:2]
        x = part.constrain(patches_RPK.astype(dtype), ("batch", "length", None))
        x = part.reshape(x, (r, p, c.num_channels, c.temporal_patch_size, c.patch_size, c.patch_size),
                         ("batch", "length", None, None, None, None))
        pe = L.params_for_compute(self.patch_embed, dtype)
        return L.linear(pe, x, "rpctij,ctijd->rpd", ACT)

    def __call__(self, inputs: dict):
        self.check_inputs(inputs)
        c, run = self.config, self.run
        dtype = L.dtype_of(run.dtype)
        # The metadata in the rows' layout under this tower's rules, whatever layout the batch came in (e.g. rows
        # flattened from microbatches by the pipelined step): the rotary tables and ids then match q and k.
        grid = part.constrain(inputs["grid"], ("batch", "length", None))
        segment_ids = part.constrain(inputs["segment_ids"], ("batch", "length"))
        slice_ids, window_ids = attention_ids(grid, segment_ids, c.spatial_merge_size, window_units(c))
        zeros = jnp.zeros_like(slice_ids)
        metas = (TokenMeta(zeros, slice_ids, slice_ids), TokenMeta(zeros, window_ids, window_ids))
        rope = rope_cos_sin(grid, c.d_model // c.n_heads, c.rope_theta)
        values, names = L.module_params(self.layers)
        gated = c.kind == "qwen2_5_vl"
        norm = (lambda p, x: L.rms_norm(p, x, c.norm_eps)) if gated else (lambda p, x: L.layer_norm(p, x, c.norm_eps))

        def body(layer, h):
            p = L.use_params(layer["p"], names, dtype, drop_leading=True)
            meta = jax.tree.map(lambda a, b: jnp.where(layer["full"], a, b), *metas)
            a = attention(p["attn"], norm(p["norm1"], h), meta, rope, impl=run.attention_impl)
            h = h + a
            y = norm(p["norm2"], h)
            h = h + (L.gated_mlp(p["mlp"], y, c.activation) if gated else L.plain_mlp(p["mlp"], y, c.activation))
            return part.constrain(h, ACT)

        x = part.constrain(self.embed(inputs["patches"]), ACT)
        stacked = {"p": values, "full": jnp.asarray(full_layers(c))}
        return L.scan_layers(body, x, stacked, run.remat, run.layer_loop)


def attention(p: dict, x_RPD, meta: TokenMeta, rope, *, impl: str):
    """Fused qkv (HF ``qkv``: [3, heads, head_dim] outputs), 2-D RoPE on q and k, kernels.attention, ``o``."""
    qkv = L.linear(p["qkv"], x_RPD, "bsd,dthk->bsthk", ("batch", "length", None, "heads", "head_dim"))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = L.apply_rope(q, *rope), L.apply_rope(k, *rope)
    out = kernels.attention(q, k, v, meta, meta, impl=impl, context_parallel=False)
    return L.linear(p["o"], out, "bshk,hkd->bsd", ACT)
