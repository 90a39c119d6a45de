"""Context-parallel attention under ``jax.shard_map`` (docs/architecture.md, 'Context parallelism').

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
  the accelerator kernel ``impl`` resolves to on the local shard (``kernels.choose``): the Pallas TPU kernel
  (``pallas_tpu.flash_attention_fwd_block`` returns the lse; ``flash_attention_bwd_block`` takes the merged lse),
  whose grid steps only the step's live tiles; the Pallas GPU kernel (``pallas_gpu``'s pair of the same name, whose
  programs loop over the step's compacted tile lists); or else ``kernels.tiled`` (the same pair of functions). No
  [S/cp, S/cp] array is materialised. Inside a pipeline stage the hop is an ``all_to_all`` over the stage's context
  group instead of a ppermute (``_hop``: (cp - 1) x the bytes and a transient [cp, shard] buffer per hop).

``kernels.attention`` calls ``context_attention`` itself under a mesh whose ``context`` axis has size > 1.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from mllm_jax.kernels.dispatch import attention, choose
from mllm_jax.kernels.meta import SKIP, TokenMeta, block_map
from mllm_jax.kernels.sharding import axes_size, axis_names, place, spec_entry
from mllm_jax.kernels.tiled import tiled_attention_bwd_block, tiled_attention_fwd_block

METHODS = ("allgather", "ring")
_RING_KWARGS = ("scale", "window", "softcap", "span_isolated", "impl", "interpret", "block_q", "block_k")


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
    if axis in axis_names(batch_axes) or axis in axis_names(head_axes):
        raise ValueError(f"axis {axis!r} shards the sequence; it cannot also shard batch or heads")
    nb = axes_size(mesh, batch_axes)
    nh = axes_size(mesh, head_axes)
    if q.shape[0] % nb:
        raise ValueError(f"batch {q.shape[0]} is not divisible by the batch axes {batch_axes} (size {nb})")
    if q.shape[2] % nh or k.shape[2] % nh:
        raise ValueError(
            f"query heads {q.shape[2]} and key/value heads {k.shape[2]} must both be divisible by the head axes "
            f"{head_axes} (size {nh})"
        )


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
        batch_axes = spec_entry(q, 0)
    if head_axes is None:
        head_axes = spec_entry(q, 2)
    _validate(q, k, v, q_meta, k_meta, mesh, axis, method, batch_axes, head_axes)
    if method == "ring":
        unknown = set(kw) - set(_RING_KWARGS)
        if unknown:
            raise ValueError(f"ring attention does not take {sorted(unknown)}; it takes {_RING_KWARGS}")
    cp = mesh.shape[axis]
    if cp == 1:
        return attention(q, k, v, q_meta, k_meta, context_parallel=False, **kw)
    hkv_local = k.shape[2] // axes_size(mesh, head_axes)
    if kv_heads_per_step < 1 or hkv_local % kv_heads_per_step:
        raise ValueError(
            f"kv_heads_per_step ({kv_heads_per_step}) must divide the key/value heads per device ({hkv_local})"
        )

    x_spec = P(batch_axes, axis, head_axes, None)
    m_spec = P(batch_axes, axis)
    meta_specs = TokenMeta(m_spec, m_spec, m_spec)
    q, k, v = (place(x, mesh, x_spec) for x in (q, k, v))
    q_meta = TokenMeta(*(place(jnp.asarray(a, jnp.int32), mesh, m_spec) for a in q_meta))
    k_meta = TokenMeta(*(place(jnp.asarray(a, jnp.int32), mesh, m_spec) for a in k_meta))

    if method == "allgather":
        body = functools.partial(_allgather_body, axis=axis, step=kv_heads_per_step, remat=remat, kw=kw)
    else:
        ring_kw = {key: kw.get(key) for key in ("scale", "window", "softcap", "block_q", "block_k")}
        ring_kw["span_isolated"] = bool(kw.get("span_isolated", False))
        ring_kw["kernel"] = _ring_kernel(kw.get("impl", "auto"), k.shape[1] // cp)
        if ring_kw["kernel"] != "tiled":
            ring_kw["interpret"] = bool(kw.get("interpret", False))
        # Inside a pipeline stage (decided here, outside this shard_map, which makes every axis manual) the hop differs.
        ring_kw["in_stage"] = _manual_stages() is not None
        body = functools.partial(_ring_attention, axis=axis, cp=cp, kw_items=tuple(sorted(ring_kw.items())))
    # check_vma=False: the per-shard attention may be a pallas_call, whose outputs carry no varying-axes type.
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
    record = _rank_tiles

    def one_group(q_g, k_g, v_g):
        return attention(q_g, gather(k_g), gather(v_g), q_meta, k_meta_all, context_parallel=False, **kw)

    def counted_group(q_g, k_g, v_g, first):
        # Recording: the forward of the kernel attention() runs here, counting its own tiles (the first KV-head group
        # only: every group computes the same tiles).
        kernel = choose(kw.get("impl", "auto"), k_meta_all.segment_ids.shape[1])
        out, _, n = _counted_forward(kernel, q_g, gather(k_g), gather(v_g), q_meta, k_meta_all, kw)
        if first:
            jax.debug.callback(lambda r, t: record.append((int(r), int(t))), jax.lax.axis_index(axis), n)
        return out.astype(q_g.dtype)

    if remat and record is None:
        one_group = jax.checkpoint(one_group)
    outs = [
        (one_group if record is None else functools.partial(counted_group, first=h == 0))(
            q[:, :, h * group : (h + step) * group], k[:, :, h : h + step], v[:, :, h : h + step])
        for h in range(0, k.shape[2], step)
    ]
    return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


# ------------------------------------------------------------------------------------------------------------ ring


def _any_visible(q_meta, k_meta, window, span_isolated):
    """Whether any pair of the two shards attends, from whole-shard block statistics (one tile per shard)."""
    sq, sk = q_meta.segment_ids.shape[1], k_meta.segment_ids.shape[1]
    bm = block_map(q_meta, k_meta, sq, sk, window=window, span_isolated=span_isolated, xp=jnp)
    return jnp.any(bm != SKIP)


def _ring_kernel(impl: str, local_keys: int) -> str:
    """The per-step kernel of the ring: "pallas_tpu" / "pallas_gpu" where ``impl`` resolves to one, else "tiled"."""
    chosen = choose(impl, local_keys)
    return chosen if chosen in ("pallas_tpu", "pallas_gpu") else "tiled"


def _block_fns(kw):
    """(forward block, backward block, their keyword arguments) of the ring's per-step kernel."""
    kw = dict(kw)
    kernel = kw.pop("kernel")
    kw.pop("in_stage")
    if kernel == "pallas_tpu":
        from mllm_jax.kernels.pallas_tpu import flash_attention_bwd_block, flash_attention_fwd_block

        return flash_attention_fwd_block, flash_attention_bwd_block, kw
    if kernel == "pallas_gpu":
        from mllm_jax.kernels.pallas_gpu import flash_attention_bwd_block, flash_attention_fwd_block

        return flash_attention_fwd_block, flash_attention_bwd_block, kw
    return tiled_attention_fwd_block, tiled_attention_bwd_block, kw


# Instrumentation (``record_rank_tiles``): a list while recording, else None; read at trace time, so programs traced
# outside the context carry no callback.
_rank_tiles: list | None = None


@contextlib.contextmanager
def record_rank_tiles():
    """Record the tiles each rank's attention forward computes, as (rank, tiles) pairs appended when a program traced
    inside this context runs: one pair per ring step (0 for a shard pair skipped whole) or per all-gather call, the
    tiles counted by the kernel itself (``_counted_forward``). For per-rank balance checks (benchmarks/cp_balance.py);
    forward only (the backward is not traced with a counter)."""
    global _rank_tiles
    previous, _rank_tiles = _rank_tiles, []
    try:
        yield _rank_tiles
    finally:
        _rank_tiles = previous


def _counted_forward(kernel, q, k, v, q_meta, k_meta, kw):
    """(out, lse, tiles) of ``kernel``'s forward ("tiled", "pallas_tpu", "pallas_gpu") of one q shard against one K/V
    shard, the tiles counted by the kernel: kernels.tiled's tile-loop counter; the Pallas GPU kernel's in-loop counter
    (of the first query head: every head computes the same tiles), summed over the batch; the Pallas TPU kernel's
    grid steps per kv head (the bounds of the grids over its scalar-prefetched live-tile lists)."""
    blocks = {key: kw.get(key) for key in ("block_q", "block_k", "scale", "window", "softcap")}
    blocks["span_isolated"] = bool(kw.get("span_isolated", False))
    if kernel == "tiled":
        from mllm_jax.kernels import tiled

        cfg = tiled._config(q, k, blocks["block_q"], blocks["block_k"], blocks["scale"], blocks["window"],
                            blocks["softcap"], blocks["span_isolated"])
        return tiled._fwd_block(cfg, q, k, v, q_meta, k_meta)
    interpret = bool(kw.get("interpret", False))
    if kernel == "pallas_gpu":
        from mllm_jax.kernels import pallas_gpu

        out, lse, n = pallas_gpu.flash_attention_fwd_block(q, k, v, q_meta, k_meta, interpret=interpret,
                                                           with_count=True, **blocks)
        return out, lse, jnp.sum(n[:, 0])
    if kernel == "pallas_tpu":
        from mllm_jax.kernels import pallas_tpu

        return pallas_tpu.flash_attention_fwd_block(q, k, v, q_meta, k_meta, interpret=interpret, with_steps=True,
                                                    **blocks)
    raise ValueError(f"record_rank_tiles counts the tiles of kernels.tiled and the Pallas kernels; this attention runs "
                     f"{kernel!r}")


def _block_forward(q, k, v, q_meta, k_meta, kw, axis=None):
    """out [B, Sq, Hq, D] (f32, normalised over this K/V shard) and lse [B, Hq, Sq] (-inf: nothing seen here)."""
    fwd_block, _, kw_ = _block_fns(kw)
    record = _rank_tiles

    def compute(_):
        if record is None:
            return (*fwd_block(q, k, v, q_meta, k_meta, **kw_), jnp.int32(0))
        return _counted_forward(kw["kernel"], q, k, v, q_meta, k_meta, kw_)

    def skip(_):
        b, sq, hq, _d = q.shape
        return (jnp.zeros((b, sq, hq, v.shape[-1]), jnp.float32), jnp.full((b, hq, sq), -jnp.inf, jnp.float32),
                jnp.int32(0))

    o, lse, n = jax.lax.cond(_any_visible(q_meta, k_meta, kw["window"], kw["span_isolated"]), compute, skip, None)
    if record is not None:
        jax.debug.callback(lambda r, t: record.append((int(r), int(t))), jax.lax.axis_index(axis), n)
    return o, lse


def _block_backward(q, k, v, q_meta, k_meta, do, lse, delta, kw):
    """(dq, dk, dv) f32 of one q shard vs one K/V shard, given the merged lse and delta = sum(do * o)."""

    _, bwd_block, kw_ = _block_fns(kw)

    def compute(_):
        return bwd_block(q, k, v, q_meta, k_meta, do, lse, delta, **kw_)

    def skip(_):
        return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

    return jax.lax.cond(_any_visible(q_meta, k_meta, kw["window"], kw["span_isolated"]), compute, skip, None)


def _merge(o, lse, o_t, lse_t):
    """Combine two normalised partial attentions [B, Sq, H, D] by their log-sum-exps [B, H, Sq] (-inf: saw nothing;
    a row with nothing on either side stays o = 0, lse = -inf, without NaN)."""
    top = jnp.maximum(lse, lse_t)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w, w_t = jnp.exp(lse - top), jnp.exp(lse_t - top)
    to_o = lambda x: jnp.transpose(x, (0, 2, 1))[..., None]  # noqa: E731 [B, H, Sq] -> [B, Sq, H, 1]
    total = w + w_t
    safe = jnp.where(total > 0, total, 1.0)
    return (o * to_o(w / safe) + o_t * to_o(w_t / safe)), top + jnp.log(total)


def _hop(axis, cp, in_stage):
    """Sends a pytree one rank on round the ring over ``axis``: a ``ppermute``.

    Inside a pipeline stage (a shard_map already manual over `pipeline`, whose stages run different ops in a tick) a
    ppermute cannot be used: it lowers to one collective permute over every device of the mesh, whose other stages
    are in other branches of the tick's switch (XLA:CPU's rendezvous waits for every device: a deadlock when only one
    stage reaches it, wrong values when two stages' different permutes meet; seen on 4 fake devices). There the hop is
    an ``all_to_all`` over ``axis``, whose replica groups are one stage's context group: the shard goes in the slot of
    the next rank, zeros in the others. It moves (cp - 1) x the bytes of the ppermute and holds a [cp, shard]
    buffer (equal bytes at cp = 2)."""
    if not in_stage:
        return functools.partial(jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % cp) for i in range(cp)])

    def one(x):
        i = jax.lax.axis_index(axis)
        to_next = (jnp.arange(cp) == (i + 1) % cp).reshape((cp,) + (1,) * x.ndim)
        got = jax.lax.all_to_all(jnp.where(to_next, x[None], jnp.zeros((), x.dtype)), axis, 0, 0, tiled=False)
        return jax.lax.dynamic_index_in_dim(got, (i - 1) % cp, 0, keepdims=False)

    return lambda tree: jax.tree.map(one, tree)


def _manual_stages(name: str = "pipeline"):
    """(axis name, size) of a manual pipeline axis of size > 1 in the current mesh (inside the pipeline's stage
    shard_map), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or name not in mesh.axis_names:
        return None
    i = mesh.axis_names.index(name)
    if mesh.axis_types[i] != AxisType.Manual or mesh.axis_sizes[i] == 1:
        return None
    return name, mesh.axis_sizes[i]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring_core(q, k, v, q_meta, k_meta, axis, cp, kw_items):
    return _ring_forward(q, k, v, q_meta, k_meta, axis, cp, kw_items)[0]


def _ring_steps(step, carry, kv, cp, hop):
    """Runs ``step(carry, kv) -> carry`` on each of the cp K/V shards as they come round the ring. The hop that
    brings the next shard is issued before the step's compute so the two overlap; the last step needs no hop. The
    first cp - 1 steps are one ``lax.scan``, so compile time and program size do not grow with cp."""

    def body(c, _):
        carry, kv = c
        nxt = hop(kv)
        return (step(carry, kv), nxt), None

    (carry, kv), _ = jax.lax.scan(body, (carry, kv), length=cp - 1)
    return step(carry, kv)


def _ring_forward(q, k, v, q_meta, k_meta, axis, cp, kw_items):
    kw = dict(kw_items)
    b, sq, hq, _d = q.shape

    def step(carry, kv):
        o_t, lse_t = _block_forward(q, kv[0], kv[1], q_meta, kv[2], kw, axis)
        return _merge(*carry, o_t, lse_t)

    init = (jnp.zeros((b, sq, hq, v.shape[-1]), jnp.float32), jnp.full((b, hq, sq), -jnp.inf, jnp.float32))
    o, lse = _ring_steps(step, init, (k, v, k_meta), cp, _hop(axis, cp, kw["in_stage"]))
    return o.astype(q.dtype), lse


def _ring_fwd_rule(q, k, v, q_meta, k_meta, axis, cp, kw_items):
    o, lse = _ring_forward(q, k, v, q_meta, k_meta, axis, cp, kw_items)
    return o, (q, k, v, q_meta, k_meta, o, lse)


def _ring_bwd_rule(axis, cp, kw_items, res, do):
    q, k, v, q_meta, k_meta, o, lse = res
    kw = dict(kw_items)
    hop = _hop(axis, cp, kw["in_stage"])
    delta = jnp.transpose(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), (0, 2, 1))  # [B,H,Sq]

    def step(carry, kv):
        dq, dk, dv = carry
        dq_t, dk_t, dv_t = _block_backward(q, kv[0], kv[1], q_meta, kv[2], do, lse, delta, kw)
        # The accumulators of the shard in hand travel with it; after cp hops they are back with their owner.
        dk, dv = hop((dk + dk_t, dv + dv_t))
        return dq + dq_t, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = _ring_steps(step, init, (k, v, k_meta), cp, hop)
    zero_meta = lambda m: TokenMeta(*(np.zeros(a.shape, jax.dtypes.float0) for a in m))  # noqa: E731
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero_meta(q_meta), zero_meta(k_meta)


_ring_core.defvjp(_ring_fwd_rule, _ring_bwd_rule)


def _ring_attention(q, k, v, q_meta, k_meta, *, axis, cp, kw_items):
    return _ring_core(q, k, v, q_meta, k_meta, axis, cp, kw_items)
