"""Encoder instances balanced over every device of the mesh, on the host, before placement.

Row-bound (``DataConfig.encoder_balance = "row_bound"``): a batch's encoder rows are laid out sample-major
(``batching``), ``slots`` rows per sample whether used or not, and the instance axis is split in contiguous chunks over
the devices (``placement``). A device then encodes whatever its rows' samples hold: one sample's eight images and
another's none land on different devices, and unused slots are encoded as zeros.

Balanced (the default): per microbatch and modality, the used instances (those ``feature_index`` points at) are
priced by ``instance_cost`` and assigned to the S shards of the encoder's instance axis (every mesh axis its "batch"
rule names: all devices by default) by ``mllm_jax.parallel.instance_balance.assign`` (LPT + refinement), whatever
row they belong to. The encoder rows are rewritten device-major, ``C`` per device (``capacity``: a few static sizes,
so few shapes compile), and ``feature_index`` is remapped to the new positions. Nothing on device changes: the
injection's gather (``multimodal.inject``) is the one collective that brings each row its features. The loss is the
row-bound one (the same features reach the same tokens; only which device computed them differs).

One process only: several hosts each hold only their rows, so there the row-bound layout is kept (``prepare``).

A native-resolution modality (docs/native_resolution.md) arrives already packed: every instance of the microbatch
first-fit into patch rows of one length (``data.native_pack``), which placement spreads over the devices like an
instance axis. Those rows are its unit of work and are kept as they are in either mode.
"""

from __future__ import annotations

import math

import numpy as np

from mllm_jax.multimodal import ENCODER_KEYS
from mllm_jax.parallel.config import MESH_AXES
from mllm_jax.parallel.instance_balance import InstancePlan, assign

MODES = ("balanced", "row_bound")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"DataConfig.encoder_balance must be one of {MODES}; got {mode!r}")


def tower_cost(tokens: int, d_model: int, d_ff: int, n_layers: int) -> float:
    """Forward FLOPs of one instance through a pre-LN transformer tower: per layer the q/k/v/o and MLP matmuls
    (2 * tokens * (4 d^2 + 2 d d_ff)) and attention's quadratic term (2 * 2 * tokens^2 * d: scores and values)."""
    t, d = float(tokens), float(d_model)
    return n_layers * (2.0 * t * (4.0 * d * d + 2.0 * d * d_ff) + 4.0 * t * t * d)


def instance_cost(encoder_config) -> float:
    """Forward FLOPs of one instance of this encoder (VisionConfig / AudioConfig): its sequence length
    (``num_positions``) through its layers."""
    return tower_cost(encoder_config.num_positions, encoder_config.d_model, encoder_config.d_ff,
                      encoder_config.n_layers)


def encoder_shards(parallel_config, name: str) -> int:
    """How many slices the instance axis of modality ``name`` is split into: the product of the sizes of the mesh axes
    that its encoder's "batch" rule names (``parallel.sharding``; every axis by default)."""
    from mllm_jax.parallel.sharding import logical_rules

    axes = dict(logical_rules(f"encoders/{name}", parallel_config)).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(int(getattr(parallel_config, a)) for a in axes if a in MESH_AXES)


def capacity(count: int) -> int:
    """The static per-device instance count for a busiest device of ``count``: the smallest of 1, 2, 3, 4, 6, 8, 12,
    16, 24, ... (powers of two and 1.5x them) that holds it, so at most ~1.5x padding and few compiled shapes."""
    c = 1
    while c < count:
        c *= 2
    return c * 3 // 4 if c >= 4 and c * 3 // 4 >= count else c


def used_slots(feature_index, features_per_instance: int, num_slots: int, *, what: str) -> np.ndarray:
    """The encoder rows a [B, S] feature_index points at, ascending."""
    fi = np.asarray(feature_index)
    used = np.unique(fi[fi >= 0] // features_per_instance)
    if len(used) and used[-1] >= num_slots:
        raise ValueError(f"{what} points at encoder row {int(used[-1])} but there are {num_slots} rows")
    return used


def plan_microbatch(feature_index, features_per_instance: int, num_slots: int, cost: float, shards: int, *,
                    what: str) -> tuple[np.ndarray, InstancePlan]:
    """(used rows, their plan over ``shards`` devices) for one microbatch's [B, S] feature_index."""
    used = used_slots(feature_index, features_per_instance, num_slots, what=what)
    return used, assign(np.full(len(used), cost), shards)


def balance_batch(batch: dict, model_config, parallel_config, *, leading: int) -> dict:
    """The batch with every modality's encoder rows assigned to devices by cost (module docstring).

    ``leading``: axes before the batch axis (1 for [M, B, ...] train batches, 0 for eval batches); encoder arrays have
    the same leading axes before their instance axis. Returns a new dict; the input is not modified."""
    index = batch.get("feature_index") or {}
    out = dict(batch)
    out["feature_index"] = dict(index)
    for key in ENCODER_KEYS:
        arrays = batch.get(key) or {}
        if not arrays:
            continue
        out[key] = dict(arrays)
        for name, x in arrays.items():
            if name not in index:
                raise ValueError(f"batch has {key}[{name!r}] but no feature_index[{name!r}]")
            if model_config.is_native_resolution(name):  # packed patch rows: kept (module docstring)
                continue
            out[key][name], out["feature_index"][name] = _balance_one(
                np.asarray(x), np.asarray(index[name]), model_config, parallel_config, name, leading, key)
    return out


def _balance_one(x, fi, model_config, parallel_config, name: str, leading: int, key: str):
    lead = x.shape[:leading]
    if fi.shape[:leading] != lead:
        raise ValueError(f"{key}[{name!r}] has leading axes {lead} but feature_index[{name!r}] has "
                         f"{fi.shape[:leading]}")
    x_MN = x.reshape((-1,) + x.shape[leading:])
    fi_MBS = fi.reshape((-1,) + fi.shape[leading:])
    t = model_config.features_per_instance(name)
    shards = encoder_shards(parallel_config, name)
    cost = instance_cost(model_config.encoders[name])
    plans = [plan_microbatch(fi_MBS[m], t, x_MN.shape[1], cost, shards, what=f"feature_index[{name!r}]")
             for m in range(x_MN.shape[0])]
    busiest = max([int(p.counts.max(initial=0)) for _, p in plans] + [1])
    # Never more rows than the row-bound layout's (rounded up to whole slices): both sizes are static for a config.
    c = max(busiest, min(capacity(busiest), -(-x_MN.shape[1] // shards)))
    new_x = np.zeros((x_MN.shape[0], shards * c) + x_MN.shape[2:], x.dtype)
    new_fi = np.full(fi_MBS.shape, -1, fi.dtype)
    for m, (used, plan) in enumerate(plans):
        pos = plan.device.astype(np.int64) * c + plan.slot
        new_x[m, pos] = x_MN[m, used]
        row_of = np.full(x_MN.shape[1], -1, np.int64)
        row_of[used] = pos
        f = fi_MBS[m]
        new_fi[m] = np.where(f >= 0, row_of[np.maximum(f, 0) // t] * t + np.maximum(f, 0) % t, -1)
    return new_x.reshape(lead + new_x.shape[1:]), new_fi.reshape(fi.shape)


def prepare(batch: dict, model_config, parallel_config, mode: str, *, leading: int) -> dict:
    """``balance_batch`` for ``mode == "balanced"`` on one process; the batch unchanged for "row_bound" (and on several
    processes, where each host holds only its rows)."""
    check_mode(mode)
    if mode == "row_bound" or not any(batch.get(k) for k in ENCODER_KEYS):
        return batch
    import jax

    if jax.process_count() > 1:
        return batch
    return balance_batch(batch, model_config, parallel_config, leading=leading)
