"""Context-parallel attention under ``jax.shard_map`` (DESIGN.md, 'Context parallelism').

The sequence axis of q, k, v and their metadata is sharded over one mesh axis (``context``); the tokens may be in any
order (parallel.context permutes them for balance) because every key carries its metadata and the mask is computed
from metadata, never from slot indices. Two methods:

- ``allgather``: each rank keeps its queries and all-gathers K/V (and the key metadata) over the axis, one KV-head
  group at a time so the next group's gather overlaps the current group's attention; ``kernels.attention`` computes
  each group. The backward is the transpose of the tiled all_gather, a ``psum_scatter`` of dK/dV (tests check the
  jaxpr); each group is rematerialised (``remat=True``) so the gathered K/V are not kept for the backward but
  gathered again, as in Llama-3's context parallelism.
- ``ring``: K/V and their metadata travel round the ring by ``ppermute``; the next hop is issued before the current
  block is computed so XLA can overlap them; partial results merge by log-sum-exp. A custom_vjp runs the backward as
  a second ring in which dK/dV accumulators travel with K/V, so no rank ever holds more than two K/V shards. Blocks
  whose metadata rules out every pair are skipped with ``lax.cond`` (real control flow inside shard_map). Each step is
  computed with the dense reference math here (it must return the log-sum-exp, which ``kernels.attention`` does not
  expose): [B, H, S/cp, S/cp] per step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels.dispatch import attention
from kernels.meta import SKIP, TokenMeta, block_map
from kernels.meta import mask as mask_rule

METHODS = ("allgather", "ring")
_NEG = -1e30  # log-sum-exp of a row that sees nothing (finite, so merges never produce inf - inf)
_RING_KWARGS = ("scale", "window", "softcap", "span_isolated", "impl", "interpret", "block_q", "block_k")


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def _spec_entry(x, dim):
    """The mesh axes that already shard ``dim`` of x (explicit-sharding meshes), else None."""
    try:
        spec = jax.typeof(x).sharding.spec
    except Exception:  # noqa: BLE001 - abstract values without a sharding (Auto meshes) carry no spec
        return None
    return spec[dim] if dim < len(spec) else None


def _names(axes) -> tuple:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _validate(q, k, v, q_meta, k_meta, mesh, axis, method, batch_axes, head_axes):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {mesh.axis_names}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, S, H, D] with k.shape == v.shape; got {q.shape}, {k.shape}, {v.shape}")
    for name, meta, want in (("q_meta", q_meta, q.shape[:2]), ("k_meta", k_meta, k.shape[:2])):
        shapes = [tuple(np.shape(a)) for a in meta]
        if any(s != tuple(want) for s in shapes):
            raise ValueError(f"{name} arrays must all be [B, S] = {tuple(want)} like {name[0]}; got {shapes}")
    cp = mesh.shape[axis]
    for name, length in (("q", q.shape[1]), ("k/v", k.shape[1])):
        if length % cp:
            raise ValueError(
                f"{name} sequence length {length} is not divisible by the {axis!r} axis size {cp}; pad it with "
                f"parallel.context.plan (padding slots have segment 0)"
            )
    if axis in _names(batch_axes) or axis in _names(head_axes):
        raise ValueError(f"axis {axis!r} shards the sequence; it cannot also shard batch or heads")
    nb = _axis_size(mesh, batch_axes)
    nh = _axis_size(mesh, head_axes)
    if q.shape[0] % nb:
        raise ValueError(f"batch {q.shape[0]} is not divisible by the batch axes {batch_axes} (size {nb})")
    if q.shape[2] % nh or k.shape[2] % nh:
        raise ValueError(
            f"query heads {q.shape[2]} and key/value heads {k.shape[2]} must both be divisible by the head axes "
            f"{head_axes} (size {nh})"
        )


def _place(x, mesh, spec):
    """On explicit-sharding meshes shard_map requires inputs already in its in_specs: reshard when they differ."""
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return x
    try:
        current = tuple(jax.typeof(x).sharding.spec)
    except Exception:  # noqa: BLE001
        current = None
    want = tuple(spec) + (None,) * (x.ndim - len(spec))
    if current is not None and tuple(current) + (None,) * (x.ndim - len(current)) == want:
        return x
    return jax.reshard(x, NamedSharding(mesh, P(*want)))


def context_attention(
    q,
    k,
    v,
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    *,
    mesh,
    axis: str = "context",
    method: str = "allgather",
    batch_axes=None,
    head_axes=None,
    kv_heads_per_step: int = 1,
    remat: bool = True,
    **attention_kwargs,
):
    """Attention of q [B, Sq, Hq, D] against k/v [B, Sk, Hkv, D] whose sequence axes are sharded over ``axis``.

    Same result as ``kernels.attention(q, k, v, q_meta, k_meta, **attention_kwargs)`` on one device (metadata gives
    the mask, so any token order is exact). ``batch_axes`` / ``head_axes`` are the mesh axes sharding the batch and
    head dimensions; by default they are read from the inputs' shardings (explicit-sharding meshes) and otherwise
    taken as replicated. ``kv_heads_per_step``: KV heads gathered per step (allgather).
    """
    kw = dict(attention_kwargs)
    if batch_axes is None:
        batch_axes = _spec_entry(q, 0)
    if head_axes is None:
        head_axes = _spec_entry(q, 2)
    _validate(q, k, v, q_meta, k_meta, mesh, axis, method, batch_axes, head_axes)
    if method == "ring":
        unknown = set(kw) - set(_RING_KWARGS)
        if unknown:
            raise ValueError(f"ring attention does not take {sorted(unknown)}; it takes {_RING_KWARGS}")
    cp = mesh.shape[axis]
    if cp == 1:
        return attention(q, k, v, q_meta, k_meta, **kw)
    hkv_local = k.shape[2] // _axis_size(mesh, head_axes)
    if kv_heads_per_step < 1 or hkv_local % kv_heads_per_step:
        raise ValueError(
            f"kv_heads_per_step ({kv_heads_per_step}) must divide the key/value heads per device ({hkv_local})"
        )

    x_spec = P(batch_axes, axis, head_axes, None)
    m_spec = P(batch_axes, axis)
    meta_specs = TokenMeta(m_spec, m_spec, m_spec)
    q, k, v = (_place(x, mesh, x_spec) for x in (q, k, v))
    q_meta = TokenMeta(*(_place(jnp.asarray(a, jnp.int32), mesh, m_spec) for a in q_meta))
    k_meta = TokenMeta(*(_place(jnp.asarray(a, jnp.int32), mesh, m_spec) for a in k_meta))

    if method == "allgather":
        body = functools.partial(_allgather_body, axis=axis, step=kv_heads_per_step, remat=remat, kw=kw)
    else:
        ring_kw = {key: kw.get(key) for key in ("scale", "window", "softcap")}
        ring_kw["span_isolated"] = bool(kw.get("span_isolated", False))
        body = functools.partial(_ring_attention, axis=axis, cp=cp, **ring_kw)
    # check_vma=False: the per-shard attention may be a pallas_call (DESIGN.md, 'Versions and the machines').
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec, meta_specs, meta_specs),
        out_specs=x_spec,
        check_vma=False,
    )(q, k, v, q_meta, k_meta)


# ------------------------------------------------------------------------------------------------------ all-gather


def _allgather_body(q, k, v, q_meta, k_meta, *, axis, step, remat, kw):
    """One rank: local queries against K/V gathered over ``axis``, ``step`` KV heads at a time."""
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    k_meta_all = TokenMeta(*(gather(a) for a in k_meta))
    group = q.shape[2] // k.shape[2]

    def one_group(q_g, k_g, v_g):
        return attention(q_g, gather(k_g), gather(v_g), q_meta, k_meta_all, **kw)

    if remat:
        one_group = jax.checkpoint(one_group)
    outs = [
        one_group(q[:, :, h * group : (h + step) * group], k[:, :, h : h + step], v[:, :, h : h + step])
        for h in range(0, k.shape[2], step)
    ]
    return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


# ------------------------------------------------------------------------------------------------------------ ring


def _logits(q_BQHGD, k_BKHD, scale, softcap):
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q_BQHGD, k_BKHD, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _visible(q_meta, k_meta, window, span_isolated):
    """Dense mask [B, 1, 1, Sq, Sk] and whether any pair of the two shards attends (from whole-shard block stats)."""
    m = mask_rule(q_meta, k_meta, window=window, span_isolated=span_isolated)[:, None, None]
    sq, sk = q_meta.segment_ids.shape[1], k_meta.segment_ids.shape[1]
    bm = block_map(q_meta, k_meta, sq, sk, window=window, span_isolated=span_isolated, xp=jnp)
    return m, jnp.any(bm != SKIP)


def _block_forward(q, k, v, q_meta, k_meta, scale, softcap, window, span_isolated):
    """Normalised output [B, Sq, Hkv, G, D] (f32) and log-sum-exp [B, Hkv, G, Sq] of one q shard vs one k shard."""
    m, any_visible = _visible(q_meta, k_meta, window, span_isolated)

    def compute(_):
        s, _t = _logits(q, k, scale, softcap)
        s = jnp.where(m, s, -jnp.inf)
        row_max = jnp.max(s, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        p = jnp.where(m, jnp.exp(s - row_max), 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32))
        lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), _NEG)[..., 0]
        return o, lse

    def skip(_):
        b, sq, h, g, d = q.shape
        return jnp.zeros((b, sq, h, g, v.shape[-1]), jnp.float32), jnp.full((b, h, g, sq), _NEG, jnp.float32)

    return jax.lax.cond(any_visible, compute, skip, None)


def _block_backward(q, k, v, q_meta, k_meta, do, lse, delta, scale, softcap, window, span_isolated):
    """dq [B,Sq,Hkv,G,D], dk, dv [B,Sk,Hkv,D] (f32) of one block, given the merged lse and delta = sum(do * o)."""
    m, any_visible = _visible(q_meta, k_meta, window, span_isolated)

    def compute(_):
        s, t = _logits(q, k, scale, softcap)
        p = jnp.where(m, jnp.exp(jnp.where(m, s, 0.0) - lse[..., None]), 0.0)  # [B, H, G, Sq, Sk]
        dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, do)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None])
        if t is not None:
            ds = ds * (1.0 - t * t)  # through the softcap's tanh
        dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32)) * scale
        dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q.astype(jnp.float32)) * scale
        return dq, dk, dv

    def skip(_):
        return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

    return jax.lax.cond(any_visible, compute, skip, None)


def _merge(o, lse, o_t, lse_t):
    """Combine two normalised partial attentions by their log-sum-exps (rows that saw nothing have lse = _NEG)."""
    new = jnp.maximum(lse, lse_t)
    new = new + jnp.log(jnp.exp(lse - new) + jnp.exp(lse_t - new))
    w, w_t = jnp.exp(lse - new), jnp.exp(lse_t - new)  # [B, H, G, Sq]
    to_o = lambda x: jnp.transpose(x, (0, 3, 1, 2))[..., None]  # noqa: E731 -> [B, Sq, H, G, 1]
    return o * to_o(w) + o_t * to_o(w_t), new


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring_core(q5, k, v, q_meta, k_meta, axis, cp, scale, softcap, window, span_isolated):
    return _ring_forward(q5, k, v, q_meta, k_meta, axis, cp, scale, softcap, window, span_isolated)[0]


def _ring_forward(q5, k, v, q_meta, k_meta, axis, cp, scale, softcap, window, span_isolated):
    hop = functools.partial(jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % cp) for i in range(cp)])
    b, sq, h, g, d = q5.shape
    o = jnp.zeros((b, sq, h, g, v.shape[-1]), jnp.float32)
    lse = jnp.full((b, h, g, sq), _NEG, jnp.float32)
    kv = (k, v, k_meta)
    for t in range(cp):
        nxt = hop(kv) if t < cp - 1 else None  # issued before this step's compute so the two overlap
        o_t, lse_t = _block_forward(q5, kv[0], kv[1], q_meta, kv[2], scale, softcap, window, span_isolated)
        o, lse = _merge(o, lse, o_t, lse_t)
        kv = nxt
    return o.astype(q5.dtype), lse


def _ring_fwd_rule(q5, k, v, q_meta, k_meta, axis, cp, scale, softcap, window, span_isolated):
    o, lse = _ring_forward(q5, k, v, q_meta, k_meta, axis, cp, scale, softcap, window, span_isolated)
    return o, (q5, k, v, q_meta, k_meta, o, lse)


def _ring_bwd_rule(axis, cp, scale, softcap, window, span_isolated, res, do):
    q5, k, v, q_meta, k_meta, o, lse = res
    hop = functools.partial(jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % cp) for i in range(cp)])
    do = do.astype(jnp.float32)
    delta = jnp.transpose(jnp.sum(do * o.astype(jnp.float32), axis=-1), (0, 2, 3, 1))  # [B, H, G, Sq]
    dq = jnp.zeros(q5.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    kv = (k, v, k_meta)
    for t in range(cp):
        nxt = hop(kv) if t < cp - 1 else None
        dq_t, dk_t, dv_t = _block_backward(
            q5, kv[0], kv[1], q_meta, kv[2], do, lse, delta, scale, softcap, window, span_isolated
        )
        dq = dq + dq_t
        # The accumulators of the shard in hand travel with it; after cp hops they are back with their owner.
        dk, dv = hop((dk + dk_t, dv + dv_t))
        kv = nxt
    zero_meta = lambda m: TokenMeta(*(np.zeros(a.shape, jax.dtypes.float0) for a in m))  # noqa: E731
    return dq.astype(q5.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_meta(q_meta), zero_meta(k_meta)


_ring_core.defvjp(_ring_fwd_rule, _ring_bwd_rule)


def _ring_attention(q, k, v, q_meta, k_meta, *, axis, cp, scale, softcap, window, span_isolated):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    q5 = q.reshape(b, sq, hkv, hq // hkv, d)
    out = _ring_core(q5, k, v, q_meta, k_meta, axis, cp, scale, softcap, window, span_isolated)
    return out.reshape(b, sq, hq, v.shape[-1])
