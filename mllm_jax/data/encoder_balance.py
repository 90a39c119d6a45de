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

Several processes (each host holds only its rows' pixels): the hosts exchange which rows are used (host side, a few
bytes a row), all compute the same plan with instances left where they are when that costs nothing, and the pixels
that must move go to their devices in one all_to_all after placement (``balance_host_rows``, ``place``;
docs/encoders.md).

A native-resolution modality (docs/native_resolution.md) arrives already packed: every instance of the microbatch
first-fit into patch rows of one length (``data.native_pack``), which placement spreads over the devices like an
instance axis. Those rows are its unit of work and are kept as they are in either mode.
"""

from __future__ import annotations

import dataclasses
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
    out, _ = _each_encoder_array(batch, model_config, lambda key, name, x, fi: (
        *_balance_one(x, fi, model_config, parallel_config, name, leading, key), None))
    return out


def _each_encoder_array(batch: dict, model_config, balance) -> tuple[dict, dict]:
    """(a copy of ``batch`` with each fixed-size modality's encoder rows and feature_index replaced by ``balance(key,
    name, x, feature_index) -> (x, feature_index, extra)``, {(key, name): extra}). Native-resolution rows are kept."""
    index = batch.get("feature_index") or {}
    out = dict(batch)
    out["feature_index"] = dict(index)
    extras = {}
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
            out[key][name], out["feature_index"][name], extras[(key, name)] = balance(
                key, name, np.asarray(x), np.asarray(index[name]))
    return out, extras


def _flat_microbatches(x, fi, leading: int, key: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [M, N, ...], feature_index [M, B, S]): the ``leading`` axes of both flattened into one, checked equal."""
    lead = x.shape[:leading]
    if fi.shape[:leading] != lead:
        raise ValueError(f"{key}[{name!r}] has leading axes {lead} but feature_index[{name!r}] has "
                         f"{fi.shape[:leading]}")
    return x.reshape((-1,) + x.shape[leading:]), fi.reshape((-1,) + fi.shape[leading:])


def _balance_one(x, fi, model_config, parallel_config, name: str, leading: int, key: str):
    lead = x.shape[:leading]
    x_MN, fi_MBS = _flat_microbatches(x, fi, leading, key, name)
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


# ----------------------------------------------------------------------------------------------------------------
# Several processes: each host holds only its rows' pixels. Every host learns which instances the whole step has
# (a small host-side exchange: one int32 per encoder row), all compute the one-process plan with instances kept where
# they are when that costs nothing (instance_balance.localize), and the pixels that must move cross devices and hosts
# in one all_to_all after placement (``place``).

RELAYOUT = "encoder_relayout"  # batch key (several processes): {(key, name): Relayout}, consumed by ``place``


@dataclasses.dataclass(frozen=True)
class Relayout:
    """instance_balance.exchange_indices' arrays for one modality: send [M, S, S, K], recv [M, S, C] (int32)."""

    send: np.ndarray
    recv: np.ndarray

    def moved_rows(self) -> int:
        """Instances that change device (each crosses the interconnect once)."""
        return int((self.send >= 0).sum())


def _host_span(mesh, rows: int, processes: int) -> tuple[int, int, int]:
    """(this host's span index, how many spans the step has, how many data x fsdp blocks a span is) for a host
    holding ``rows`` encoder rows per microbatch: the step's instance axis is the hosts' equal, contiguous spans
    (distributed.host_local_slice); with fewer batch blocks than hosts, hosts share a block (then a span)."""
    from mllm_jax import distributed

    blocks = math.prod(mesh.shape[a] for a in distributed.BATCH_AXES if a in mesh.axis_names)
    spans = min(blocks, processes)
    span = distributed.host_local_slice(rows * spans, mesh)
    if span.stop - span.start != rows:
        raise ValueError(f"this host holds rows {span} of {rows * spans} encoder rows; expected a span of {rows}")
    return span.start // rows, spans, blocks // spans


def _padded_rows(rows: int, shards: int, spans: int, blocks: int) -> int:
    """A host's encoder rows padded (unused zero rows at its end) so the step's instance axis splits evenly over the
    encoder's ``shards`` devices and each span over the ``blocks`` it is staged in."""
    q = math.lcm(blocks, shards // math.gcd(shards, spans))
    return -(-rows // q) * q


def _allgather(vector: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(vector))


def balance_host_rows(batch: dict, model_config, parallel_config, mesh, *, leading: int, processes: int | None = None,
                      gather=_allgather, span: tuple | None = None) -> dict:
    """Several processes: this host's rows of a batch, its encoder rows padded to equal spans, feature_index pointing
    at the balanced layout, and ``batch[RELAYOUT]`` holding how ``place`` makes that layout on device.

    ``gather(vector) -> [processes, len]``: every host's vector (jax's process_allgather; a collective, so every
    process calls this for the same batches). Each host sends its span's position and which of its encoder rows are
    used; all then hold the same used set and compute the same plan (the one-process plan's loads, by
    ``assign``, with instances ``localize``d). ``processes`` and ``span`` (this host's span index, the number of
    spans, data x fsdp blocks per span; default ``_host_span``) stand in for the runtime's in tests of one process."""
    import jax

    processes = jax.process_count() if processes is None else processes
    out, relayout = _each_encoder_array(batch, model_config, lambda key, name, x, fi: _balance_host_one(
        x, fi, model_config, parallel_config, mesh, name, leading, key, processes, gather, span))
    out[RELAYOUT] = relayout
    return out


def _balance_host_one(x, fi, model_config, parallel_config, mesh, name, leading, key, processes, gather, span):
    from mllm_jax.parallel.instance_balance import exchange_indices, localize, pair_count

    lead = x.shape[:leading]
    x_MN, fi_MBS = _flat_microbatches(x, fi, leading, key, name)
    M, rows = x_MN.shape[:2]
    t = model_config.features_per_instance(name)
    shards = encoder_shards(parallel_config, name)
    b, spans, blocks = _host_span(mesh, rows, processes) if span is None else span
    start = b * rows
    padded = _padded_rows(rows, shards, spans, blocks)
    # This host's used rows, in its span: f // t - start (feature_index is global within the microbatch).
    used_MR = np.zeros((M, padded), np.int32)
    for m in range(M):
        used = used_slots(fi_MBS[m], t, start + rows, what=f"feature_index[{name!r}]")
        if len(used) and used[0] < start:
            raise ValueError(f"feature_index[{name!r}] of this host points at encoder row {int(used[0])}, before its "
                             f"span [{start}, {start + rows})")
        used_MR[m, used - start] = 1
    got = np.asarray(gather(np.concatenate([[b], used_MR.reshape(-1)]).astype(np.int32)))
    if got.shape != (processes, 1 + M * padded) or set(got[:, 0].tolist()) != set(range(spans)):
        raise ValueError(f"the hosts' encoder metadata has shape {got.shape} and spans {got[:, 0].tolist()}; expected "
                         f"{(processes, 1 + M * padded)} covering spans 0..{spans - 1}")
    used_MN = np.zeros((M, spans * padded), bool)  # the step's used rows in the padded row-bound axis
    for p, s in enumerate(got[:, 0]):  # hosts sharing a span hold the same rows
        used_MN[:, s * padded:(s + 1) * padded] = got[p, 1:].reshape(M, padded) > 0
    n = spans * padded // shards  # row-bound rows per encoder device
    cost = instance_cost(model_config.encoders[name])
    rows_M, plans = [], []
    for m in range(M):
        g = np.flatnonzero(used_MN[m])
        costs = np.full(len(g), cost)
        rows_M.append(g)
        plans.append(localize(assign(costs, shards), costs, g // n))
    busiest = max([int(p.counts.max(initial=0)) for p in plans] + [1])
    c = max(busiest, min(capacity(busiest), -(-spans * rows // shards)))  # the one-process path's C
    k = max(pair_count(p, g // n) for p, g in zip(plans, rows_M))
    send, recv = exchange_indices(plans, rows_M, n, c, capacity(k) if k else 0)
    # This host's feature_index -> the planned positions (device * C + slot).
    new_fi = np.full(fi_MBS.shape, -1, fi.dtype)
    for m, (g, plan) in enumerate(zip(rows_M, plans)):
        row_of = np.full(spans * padded, -1, np.int64)
        row_of[g] = plan.device.astype(np.int64) * c + plan.slot
        f = fi_MBS[m]
        local = np.maximum(f, 0) // t - start + b * padded
        new_fi[m] = np.where(f >= 0, row_of[np.where(f >= 0, local, 0)] * t + np.maximum(f, 0) % t, -1)
    new_x = np.zeros((M, padded) + x_MN.shape[2:], x.dtype)
    new_x[:, :rows] = x_MN
    return new_x.reshape(lead + new_x.shape[1:]), new_fi.reshape(fi.shape), Relayout(send, recv)


def place(batch: dict, mesh, *, leading: int, rule_table=None) -> dict:
    """placement.put_batch, then (several processes, balanced) each modality's row-bound encoder rows moved to their
    planned devices by one all_to_all (instance_balance.move_rows) as ``batch[RELAYOUT]`` says."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mllm_jax.data import placement
    from mllm_jax.parallel.instance_balance import move_rows

    relayout = batch.get(RELAYOUT)
    if relayout is None:
        return placement.put_batch(batch, mesh, leading=leading, rule_table=rule_table)
    if leading != 1:
        raise ValueError(f"balanced encoder rows of several processes need train batches [M, ...] (leading=1); got "
                         f"leading={leading}")
    placed = placement.put_batch({k: v for k, v in batch.items() if k != RELAYOUT}, mesh, leading=leading,
                                 rule_table=rule_table)
    for (key, name), r in relayout.items():
        x = placed[key][name]
        S = r.recv.shape[1]
        axes = placement.encoder_spec(mesh, rule_table, name, x.shape, leading)[leading]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if math.prod(mesh.shape[a] for a in axes) != S:
            raise ValueError(f"{key}[{name!r}] of shape {x.shape} is split over {axes} but its plan has {S} devices")
        sharding = NamedSharding(mesh, P(None, axes))
        index = [jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in (r.send, r.recv)]
        with jax.set_mesh(mesh):
            placed[key][name] = move_rows(x, *index, mesh, axes)
    return placed


def prepare(batch: dict, model_config, parallel_config, mode: str, *, leading: int, whole_batch: bool = False,
            mesh=None) -> dict:
    """The batch with its encoder instances assigned to devices by cost for ``mode == "balanced"``; unchanged for
    "row_bound". One process (or ``whole_batch``: every host holds the whole batch, e.g. held-out batches):
    ``balance_batch``. Several processes, each with its rows: ``balance_host_rows`` (a collective: every process
    calls it for the same batch), then ``place`` puts the batch on ``mesh`` (default: the layout's)."""
    check_mode(mode)
    if mode == "row_bound" or not any(batch.get(k) for k in ENCODER_KEYS):
        return batch
    import jax

    if jax.process_count() == 1 or whole_batch:
        return balance_batch(batch, model_config, parallel_config, leading=leading)
    if mesh is None:
        from mllm_jax.parallel.mesh import make_mesh

        mesh = make_mesh(parallel_config)
    return balance_host_rows(batch, model_config, parallel_config, mesh, leading=leading)
