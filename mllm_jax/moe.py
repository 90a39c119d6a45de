"""Mixture-of-experts MLP: top-k routing, dropless grouped-matmul dispatch, expert parallelism by all-to-all.

One MoE MLP (``moe_mlp``) on already-gathered parameters ``{"router", "experts": {gate, up, down}, "shared",
"shared_gate"}``:

- the router: logits = x . w_router (float32); gates = softmax (or sigmoid) of the logits; the top-k experts per
  token, their gates renormalised to sum to 1 when ``norm_topk_prob`` (Mixtral, Qwen3-MoE; Qwen2-MoE does not);
- dispatch: the token-expert assignments sorted by expert and run as grouped matmuls (``grouped_ffn``): no row is
  computed for an expert it was not routed to. ``moe_capacity_factor`` drops the assignments past an expert's
  capacity instead (each expert then takes at most ceil(c * tokens * k / E) rows);
- on a mesh the block runs per shard under ``jax.shard_map``: each device routes its own tokens; when the experts
  are sharded (logical axis "experts", by default over the `expert` mesh axis) the assignments travel to the
  experts' devices and back by ``jax.lax.all_to_all``; expert weights split over `tensor` (logical "expert_mlp")
  give partial outputs summed over `tensor`;
- router statistics (``MoEStats``: selections and probability mass per expert, z-loss sum, token count) are summed
  over every device's tokens, so the auxiliary losses and the imbalance metric are the global batch's whatever the
  layout.

``dense_moe`` (every expert on every token, weighted by the one-hot combine matrix) is the test oracle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import layers as L
from mllm_jax import partitioning as part
from mllm_jax.kernels.sharding import current_mesh

MOE_IMPLS = ("auto", "ragged_dot", "tiled", "megablox", "dense")
ROUTER_ACTIVATIONS = ("softmax", "sigmoid")


class MoEStats(NamedTuple):
    """Router statistics of one MoE layer over the whole batch (float32): what the auxiliary losses and the load
    metrics are made of. Stacked [n_moe_layers, ...] out of the layer scan."""

    counts: jax.Array  # [E] top-k selections per expert (before any capacity drop)
    prob_sum: jax.Array  # [E] router probabilities summed over tokens
    z_sum: jax.Array  # [] sum over tokens of logsumexp(logits)^2
    tokens: jax.Array  # [] tokens routed


def validate(cfg) -> None:
    """Refuse MoE options the block cannot run, naming the value given."""
    if cfg.n_experts < 0:
        raise ValueError(f"LLMConfig.n_experts must be >= 0; got {cfg.n_experts}")
    if cfg.n_experts == 0:
        return
    if not 1 <= cfg.experts_per_token <= cfg.n_experts:
        raise ValueError(f"LLMConfig.experts_per_token must be in [1, n_experts={cfg.n_experts}]; got "
                         f"{cfg.experts_per_token}")
    if cfg.router_activation not in ROUTER_ACTIVATIONS:
        raise ValueError(f"LLMConfig.router_activation must be one of {ROUTER_ACTIVATIONS}; got "
                         f"{cfg.router_activation!r}")
    if cfg.moe_impl not in MOE_IMPLS:
        raise ValueError(f"LLMConfig.moe_impl must be one of {MOE_IMPLS}; got {cfg.moe_impl!r}")
    if cfg.moe_capacity_factor is not None and not cfg.moe_capacity_factor > 0:
        raise ValueError(f"LLMConfig.moe_capacity_factor must be > 0 or None (dropless); got "
                         f"{cfg.moe_capacity_factor}")
    if cfg.moe_layer_freq < 1:
        raise ValueError(f"LLMConfig.moe_layer_freq must be >= 1; got {cfg.moe_layer_freq}")
    if cfg.shared_expert_gate and not cfg.shared_expert_d_ff:
        raise ValueError("LLMConfig.shared_expert_gate needs a shared expert (shared_expert_d_ff > 0); got "
                         f"shared_expert_d_ff={cfg.shared_expert_d_ff}")


# ----------------------------------------------------------------------------------------------------------------
# Router


def route(w_router_DE, x_TD, cfg):
    """(logits [T, E] float32, probs [T, E], gates [T, k], expert ids [T, k] int32)."""
    logits = jnp.matmul(x_TD.astype(jnp.float32), w_router_DE.astype(jnp.float32))
    if cfg.router_activation == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        probs = jax.nn.sigmoid(logits)
    top, ids = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return logits, probs, top, ids.astype(jnp.int32)


def router_stats(logits_TE, probs_TE, ids_Tk, n_experts: int) -> MoEStats:
    counts = jnp.zeros((n_experts,), jnp.float32).at[ids_Tk.reshape(-1)].add(1.0)
    z = jax.nn.logsumexp(logits_TE, axis=-1)
    return MoEStats(counts, jnp.sum(probs_TE, axis=0), jnp.sum(z * z), jnp.asarray(logits_TE.shape[0], jnp.float32))


def load_balancing_loss(stats: MoEStats, top_k: int):
    """transformers' ``load_balancing_loss_func`` of one layer's router logits (no attention mask): E * sum_e
    (selections_e / T) * (mean probability_e). ``stats`` may carry leading layer axes: one loss per layer."""
    e = stats.counts.shape[-1]
    t = stats.tokens[..., None]
    del top_k  # the selections already count all k choices (HF histc over the [T, k] ids)
    return e * jnp.sum((stats.counts / t) * (stats.prob_sum / t), axis=-1)


def z_loss(stats: MoEStats):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (per layer when stacked)."""
    return stats.z_sum / stats.tokens


def load_imbalance(stats: MoEStats):
    """max / mean tokens per expert (1 = perfectly balanced, E / k = everything on one expert's share)."""
    return jnp.max(stats.counts, axis=-1) / jnp.maximum(jnp.mean(stats.counts, axis=-1), 1e-9)


def objective_terms(stats: MoEStats, cfg):
    """(aux, z): the load-balancing loss and z-loss averaged over the stacked MoE layers (what the objective adds,
    times router_aux_loss_coef / router_z_loss_coef)."""
    return jnp.mean(load_balancing_loss(stats, cfg.experts_per_token)), jnp.mean(z_loss(stats))


def layer_penalty(stats: MoEStats, cfg):
    """One MoE layer's objective term: aux_coef * load-balancing loss + z_coef * z-loss."""
    return (cfg.router_aux_loss_coef * load_balancing_loss(stats, cfg.experts_per_token)
            + cfg.router_z_loss_coef * z_loss(stats))


@jax.custom_vjp
def with_loss_gradient(h, loss, weight):
    """``h`` unchanged; in the backward pass ``loss`` receives the cotangent ``weight`` as if ``weight * loss`` were
    added to the objective (Megatron's MoEAuxLossAutoScaler): how a pipeline stage, whose layers return only
    activations, still trains its routers with the auxiliary losses."""
    del loss, weight
    return h


def _wlg_fwd(h, loss, weight):
    return h, (loss, weight)


def _wlg_bwd(res, g):
    loss, weight = res
    return g, (jnp.ones_like(loss) * weight).astype(loss.dtype), jnp.zeros_like(weight)


with_loss_gradient.defvjp(_wlg_fwd, _wlg_bwd)


def combine(stats_list):
    """Stack per-layer MoEStats (a list of [n_i, ...] stacks) in layer order."""
    stats_list = [s for s in stats_list if s is not None]
    if not stats_list:
        return None
    return MoEStats(*(jnp.concatenate(xs, axis=0) for xs in zip(*stats_list)))


# ----------------------------------------------------------------------------------------------------------------
# Grouped matmuls over rows sorted by expert


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"


def _tile_rows(rows: int, groups: int) -> int:
    """Row tile of the tiled grouped matmul: about the mean rows per group, a power of two in [8, 128]."""
    mean = max(1, rows // max(1, groups))
    return int(min(128, max(8, 2 ** math.ceil(math.log2(mean)))))


def _tiled_layout(group_sizes_G, rows: int):
    """For rows sorted by group (group g holds group_sizes[g] rows, the rest past their sum unused): each row's
    destination in a [n_tiles * b] buffer whose tiles each hold one group, and each tile's group."""
    g = group_sizes_G.shape[0]
    b = _tile_rows(rows, g)
    n_tiles = -(-rows // b) + g  # sum over groups of ceil(n_g / b) <= rows / b + groups
    padded = (group_sizes_G + b - 1) // b * b
    pend = jnp.cumsum(padded)
    pstart = pend - padded
    start = jnp.cumsum(group_sizes_G) - group_sizes_G
    row = jnp.arange(rows, dtype=jnp.int32)
    grp = jnp.clip(jnp.searchsorted(jnp.cumsum(group_sizes_G), row, side="right"), 0, g - 1).astype(jnp.int32)
    valid = row < jnp.sum(group_sizes_G)
    dest = jnp.where(valid, pstart[grp] + row - start[grp], n_tiles * b)  # out of range: dropped by the scatter
    tile_group = jnp.clip(jnp.searchsorted(pend, jnp.arange(n_tiles, dtype=jnp.int32) * b, side="right"), 0,
                          g - 1).astype(jnp.int32)
    return b, n_tiles, dest, valid, tile_group


def _tiled_matmul(x_AK, w_GKN, layout):
    """Rows x (sorted by group) times their group's matrix: rows scattered into tiles of one group each, one batched
    matmul over the tiles with each tile's matrix gathered."""
    b, n_tiles, dest, valid, tile_group = layout
    xt = jnp.zeros((n_tiles * b, x_AK.shape[1]), x_AK.dtype).at[dest].set(x_AK, mode="drop")
    yt = jnp.einsum("tbk,tkn->tbn", xt.reshape(n_tiles, b, -1), w_GKN[tile_group])
    y = yt.reshape(n_tiles * b, -1).at[jnp.minimum(dest, n_tiles * b - 1)].get()
    return jnp.where(valid[:, None], y, 0)


def _megablox_matmul(x_AK, w_GKN, group_sizes_G):
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    rows = x_AK.shape[0]
    tm = 128
    pad = -rows % tm
    xp = jnp.pad(x_AK, ((0, pad), (0, 0)))
    tk, tn = min(128, w_GKN.shape[1]), min(128, w_GKN.shape[2])
    y = gmm(xp, w_GKN, group_sizes_G.astype(jnp.int32), preferred_element_type=x_AK.dtype, tiling=(tm, tk, tn))
    return y[:rows]


def grouped_ffn(x_AD, group_sizes_G, experts: dict, act: str, impl: str):
    """down(act(gate(x)) * up(x)) of rows sorted by expert: rows [sum(group_sizes[:g]), +group_sizes[g]) use expert
    g's weights (experts: gate/up [G, D, F], down [G, F, D]); rows past sum(group_sizes) come out zero."""
    impl = resolve_impl(impl)
    wg, wu, wd = (experts[n]["kernel"] for n in ("gate", "up", "down"))
    gs = group_sizes_G.astype(jnp.int32)
    if impl == "ragged_dot":
        mm = lambda x, w: jax.lax.ragged_dot(x, w, gs)  # noqa: E731
    elif impl == "megablox":
        mm = lambda x, w: _megablox_matmul(x, w, gs)  # noqa: E731
    elif impl == "tiled":
        layout = _tiled_layout(gs, x_AD.shape[0])
        mm = lambda x, w: _tiled_matmul(x, w, layout)  # noqa: E731
    else:
        raise ValueError(f"grouped_ffn impl must be 'ragged_dot', 'tiled' or 'megablox'; got {impl!r}")
    h = L.activation(act)(mm(x_AD, wg)) * mm(x_AD, wu)
    return mm(h, wd)


def dense_moe(x_TD, combine_TE, experts: dict, act: str):
    """The oracle: every expert on every token, summed with the combine weights [T, E] (0 where not routed)."""
    wg, wu, wd = (experts[n]["kernel"] for n in ("gate", "up", "down"))
    h = L.activation(act)(jnp.einsum("td,edf->tef", x_TD, wg)) * jnp.einsum("td,edf->tef", x_TD, wu)
    y = jnp.einsum("tef,efd->ted", h, wd)
    return jnp.einsum("ted,te->td", y, combine_TE.astype(y.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def _rank_in_group(keys_A, n_groups: int):
    """(stable sort order of keys, each element's rank among the elements with its key, count per key)."""
    order = jnp.argsort(keys_A, stable=True)
    counts = jnp.zeros((n_groups,), jnp.int32).at[keys_A].add(1, mode="drop")
    starts = jnp.cumsum(counts) - counts
    sorted_keys = keys_A[order]
    rank_sorted = jnp.arange(keys_A.shape[0], dtype=jnp.int32) - starts[jnp.minimum(sorted_keys, n_groups - 1)]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    return order, rank, counts


def capacity(rows: int, groups: int, factor: float | None) -> int | None:
    """Rows one group (an expert, or a destination device) takes: None without a capacity factor (dropless)."""
    return None if factor is None else max(1, int(math.ceil(factor * rows / groups)))


def _expert_compute(x_AD, keys_A, n_groups: int, experts: dict, act: str, impl: str, cap: int | None):
    """Rows with expert keys in [0, n_groups) (anything else: not computed, output 0), sorted, grouped-matmul'ed,
    unsorted. With ``cap`` each key keeps its first ``cap`` rows (the rest dropped). -> (y [A, D], kept [A])."""
    _, rank, _ = _rank_in_group(keys_A, n_groups)
    kept = (keys_A < n_groups) & (keys_A >= 0)
    if cap is not None:
        kept = kept & (rank < cap)
    keys = jnp.where(kept, keys_A, n_groups)
    order = jnp.argsort(keys, stable=True)
    sizes = jnp.zeros((n_groups,), jnp.int32).at[keys].add(1, mode="drop")
    ys = grouped_ffn(x_AD[order], sizes, experts, act, impl)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return jnp.where(kept[:, None], y, 0), kept


def dispatch(x_TD, gates_Tk, ids_Tk, experts: dict, cfg, *, ep_axes=(), ep: int = 1):
    """The routed experts' output [T, D] for local tokens. ``ep`` > 1 (inside shard_map): this device holds experts
    [rank * E/ep, (rank + 1) * E/ep) and the assignments are exchanged over ``ep_axes`` by all-to-all."""
    t, k = ids_Tk.shape
    e, act, impl = cfg.n_experts, cfg.activation, cfg.moe_impl
    a = t * k
    token_A = jnp.arange(a, dtype=jnp.int32) // k
    x_AD = x_TD[token_A]
    ids_A = ids_Tk.reshape(-1)
    if resolve_impl(impl) == "dense" and ep == 1:
        kept = jnp.ones((a,), bool)
        cap = capacity(a, e, cfg.moe_capacity_factor)
        if cap is not None:
            _, rank, _ = _rank_in_group(ids_A, e)
            kept = rank < cap
        w_A = jnp.where(kept, gates_Tk.reshape(-1), 0.0)
        comb = jnp.zeros((t, e), jnp.float32).at[token_A, ids_A].add(w_A)
        return dense_moe(x_TD, comb, experts, act)
    if resolve_impl(impl) == "dense":
        impl = "ragged_dot" if jax.default_backend() != "cpu" else "tiled"
    if ep == 1:
        y_AD, kept = _expert_compute(x_AD, ids_A, e, experts, act, impl, capacity(a, e, cfg.moe_capacity_factor))
    else:
        y_AD, kept = _exchange(x_AD, ids_A, experts, cfg, impl, ep_axes, ep)
    w_A = jnp.where(kept, gates_Tk.reshape(-1), 0.0).astype(y_AD.dtype)
    return jnp.sum((y_AD * w_A[:, None]).reshape(t, k, -1), axis=1)


def _exchange(x_AD, ids_A, experts: dict, cfg, impl: str, ep_axes, ep: int):
    """Expert parallelism: assignment rows to the device holding their expert (all-to-all), grouped matmuls there
    over the local experts, results back (all-to-all). Per destination a static buffer of ``cap`` rows: every
    assignment when dropless (the worst case: all on one device), ceil(c * A / ep) with a capacity factor."""
    a, d = x_AD.shape
    e_local = cfg.n_experts // ep
    dest_A = ids_A // e_local
    cap = capacity(a, ep, cfg.moe_capacity_factor) or a
    _, rank, _ = _rank_in_group(dest_A, ep)
    kept = rank < cap
    slot = jnp.where(kept, dest_A * cap + rank, ep * cap)
    send = jnp.zeros((ep * cap, d), x_AD.dtype).at[slot].set(x_AD, mode="drop")
    send_ids = jnp.full((ep * cap,), -1, jnp.int32).at[slot].set(ids_A % e_local, mode="drop")
    recv = jax.lax.all_to_all(send.reshape(ep, cap, d), ep_axes, 0, 0)
    recv_ids = jax.lax.all_to_all(send_ids.reshape(ep, cap), ep_axes, 0, 0)
    keys = jnp.where(recv_ids >= 0, recv_ids, e_local).reshape(-1)
    y_recv, _ = _expert_compute(recv.reshape(ep * cap, d), keys, e_local, experts, cfg.activation, impl, None)
    back = jax.lax.all_to_all(y_recv.reshape(ep, cap, d), ep_axes, 0, 0).reshape(ep * cap, d)
    y = back.at[jnp.minimum(slot, ep * cap - 1)].get()
    return jnp.where(kept[:, None], y, 0), kept


# ----------------------------------------------------------------------------------------------------------------
# The block


def _local_block(p: dict, x_TD, cfg, *, ep_axes=(), ep: int = 1, token_axes=(), tensor_axes=(),
                 replicated: bool = False):
    """Router + routed experts on local tokens -> (y [T, D], stats summed over ``token_axes``). ``replicated``: every
    device of the expert axes holds the same tokens (the batch too small to split over them): each computes its own
    experts' share and the shares are summed over the expert axes (no all-to-all)."""
    logits, probs, gates, ids = route(p["router"]["kernel"], x_TD, cfg)
    stats = router_stats(logits, probs, ids, cfg.n_experts)
    if replicated:
        e_local = cfg.n_experts // ep
        local = ids - jax.lax.axis_index(ep_axes) * e_local
        mine = (local >= 0) & (local < e_local)
        sub = dataclasses.replace(cfg, n_experts=e_local, moe_capacity_factor=None)
        y = dispatch(x_TD, jnp.where(mine, gates, 0.0), jnp.where(mine, local, 0), p["experts"], sub)
        y = jax.lax.psum(y, ep_axes)
    else:
        y = dispatch(x_TD, gates, ids, p["experts"], cfg, ep_axes=ep_axes, ep=ep)
    if tensor_axes:
        y = jax.lax.psum(y, tensor_axes)
    if token_axes:
        stats = MoEStats(*(jax.lax.psum(s, token_axes) for s in stats))
    return y, stats


def _spec(x) -> tuple:
    try:
        spec = jax.typeof(x).sharding.spec
    except Exception:  # noqa: BLE001 - no sharding in the type (no Explicit mesh)
        return ()
    return tuple(spec)


def _axes(entry) -> tuple:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def moe_mlp(p: dict, x_BSD, cfg, run=None):
    """The MoE MLP on normed hidden states: (routed experts (+ shared expert) output [B, S, D], MoEStats)."""
    b, s, d = x_BSD.shape
    mesh = _layout_mesh(x_BSD)
    routed = {"router": p["router"], "experts": p["experts"]}
    if mesh is None:
        y, stats = _local_block(routed, x_BSD.reshape(b * s, d), cfg)
        y = y.reshape(b, s, d)
    else:
        y, stats = _sharded_block(routed, x_BSD, cfg, mesh)
    if "shared" in p:
        lora = run.lora_scale if run is not None else 0.0
        sh = L.gated_mlp(p["shared"], x_BSD, cfg.activation, lora_scale=lora)
        if "shared_gate" in p:
            g = L.linear(p["shared_gate"], x_BSD, "bsd,do->bso", ("batch", "length", None))
            sh = sh * jax.nn.sigmoid(g.astype(jnp.float32)).astype(sh.dtype)
        y = y + sh
    return y, stats


def _layout_mesh(x):
    """The mesh the block runs per shard on: the current one, or the one ``x``'s type is laid out on, unless every
    axis is already manual (inside a shard_map: arrays are per-device). Even with every axis of size 1 the block runs
    under shard_map there: jax infers no Explicit-mesh layout for ragged_dot (forward or transposed)."""
    mesh = current_mesh()
    if mesh is None:
        sh = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sh, "mesh", None)
        if mesh is None or mesh.empty:
            return None
    if all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def _sharded_block(routed: dict, x_BSD, cfg, mesh):
    """``_local_block`` per device under shard_map over the axes not already manual: tokens as the activations are
    laid out, experts over their storage axes (all-to-all over those), expert hidden over `tensor` (psum)."""
    x_spec = _spec(x_BSD) or (None, None, None)
    token_axes = tuple(a for entry in x_spec[:2] for a in _axes(entry))
    w_specs = jax.tree.map(lambda w: jax.sharding.PartitionSpec(*(_spec(w) or (None,) * w.ndim)), routed)
    gate_spec = tuple(w_specs["experts"]["gate"]["kernel"])
    ep_axes = _axes(gate_spec[0])
    tensor_axes = _axes(gate_spec[2])
    if _axes(x_spec[2]) or _axes(tuple(w_specs["router"]["kernel"])[0]):
        raise ValueError(f"the MoE block needs whole hidden vectors per device; got activations laid out "
                         f"{x_spec} and the router {tuple(w_specs['router']['kernel'])}")
    ep = int(np.prod([mesh.shape[a] for a in ep_axes])) if ep_axes else 1
    if cfg.n_experts % ep:
        raise ValueError(f"LLMConfig.n_experts={cfg.n_experts} is not divisible by the {ep} devices of the expert "
                         f"axes {ep_axes}")
    replicated = ep > 1 and not set(ep_axes) & set(token_axes)
    if ep > 1 and not replicated and not set(ep_axes) <= set(token_axes):
        raise ValueError(f"expert axes {ep_axes} must split the tokens entirely or not at all (the LLM's batch "
                         f"rule); the tokens are split over {token_axes}")

    def body(w, x):
        bl, sl, d = x.shape
        y, stats = _local_block(w, x.reshape(bl * sl, d), cfg, ep_axes=ep_axes, ep=ep, token_axes=token_axes,
                                tensor_axes=tensor_axes, replicated=replicated)
        return y.reshape(bl, sl, d), stats

    P = jax.sharding.PartitionSpec
    stats_spec = MoEStats(P(), P(), P(), P())
    # The megablox Pallas call types its outputs without varying axes, which check_vma refuses; its gradients under
    # tensor- or token-sharded psums are then not type-checked (untested: no TPU here).
    check = resolve_impl(cfg.moe_impl) != "megablox"
    return jax.shard_map(body, mesh=mesh, in_specs=(w_specs, P(*x_spec)), out_specs=(P(*x_spec), stats_spec),
                         check_vma=check)(routed, x_BSD)


# ----------------------------------------------------------------------------------------------------------------
# Parameters


def expert_names() -> dict:
    """Logical names of the routed experts' kernels (one layer)."""
    return {"gate": ("experts", "embed", "expert_mlp"), "up": ("experts", "embed", "expert_mlp"),
            "down": ("experts", "expert_mlp", "embed")}


def use_moe_params(values: dict, names: dict, dtype, *, drop_leading: bool = True) -> dict:
    """``layers.use_params`` for one MoE layer, except that the routed experts stay split over the axes their
    "experts" rule names even where those also carry the batch (expert parallelism over `expert` or `data`): only
    FSDP's other storage axes are gathered."""
    out = {k: L.use_params(v, names[k], dtype, drop_leading=drop_leading) for k, v in values.items()
           if k != "experts"}
    rules = dict(part.current_rules() or ())
    keep = set(part._axes_of(rules.get("experts")))
    drop = tuple(a for a in part.batch_axes() if a not in keep)

    def one(x, n):
        n = tuple(n[1:]) if drop_leading else tuple(n)
        mesh = part._mesh()
        if mesh is not None and part._explicit(mesh):
            sp = part.spec(n, x.shape, drop=drop)
            if sp is not None:
                x = jax.sharding.reshard(x, sp)
        return x.astype(dtype)

    out["experts"] = jax.tree.map(one, values["experts"], names["experts"],
                                  is_leaf=lambda n: n is None or isinstance(n, tuple))
    return out
