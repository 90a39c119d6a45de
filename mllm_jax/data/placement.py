"""Host batches -> global, sharded jax.Arrays in the layouts the model's specs expect.

- Token arrays ([.., B, S]: input_ids, labels, positions, segment_ids, span_ids, feature_index) shard their batch
  axis over the `data` x `fsdp` mesh axes of size > 1 (Explicit sharding types must agree with the model's specs,
  which leave size-1 axes out) and, under context parallelism, their sequence axis over `context` (the LLM rule maps
  activation "length" to "context"; the sequence is already permuted by mllm_jax.data.context_batches).
- Encoder inputs and cached encoder features ([.., N, ...]; a native-resolution modality's dict of packed patch
  rows [.., R, P, ...], docs/native_resolution.md) shard their instance (row) axis by the encoder's own "batch" rule
  (parallel.sharding: spread over every mesh axis that divides it), so each device encodes only its share of
  the images and clips (mllm_jax.data.encoder_balance decides which instances that share holds).

Multi-host: each process passes only its rows (distributed.host_local_slice); they are stitched along the batch axes
into global arrays (distributed.global_batch) and then laid out as above on device.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import distributed
from mllm_jax.multimodal import ENCODER_KEYS

BATCH_AXES = distributed.BATCH_AXES


def batch_axes(mesh) -> tuple:
    """The data/fsdp mesh axes of size > 1 (the model's specs leave size-1 axes out)."""
    return tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)


def _axis_entry(axes: tuple):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def token_spec(mesh, shape: tuple, leading: int) -> P:
    """[.., B, S, ...]: B (at ``leading``) over data x fsdp where that divides B, S over `context` when > 1."""
    spec = [None] * len(shape)
    axes = batch_axes(mesh)
    if axes and shape[leading] % int(np.prod([mesh.shape[a] for a in axes])) == 0:
        spec[leading] = _axis_entry(axes)
    cp = mesh.shape["context"]
    if cp > 1:
        if shape[leading + 1] % cp:
            raise ValueError(f"token array of shape {shape}: sequence length {shape[leading + 1]} is not divisible by "
                             f"the context axis ({cp}); permute the batch with parallel.context first")
        spec[leading + 1] = "context"
    return P(*spec)


def encoder_spec(mesh, rule_table, name: str, shape: tuple, leading: int) -> P:
    """The encoder's "batch" rule applied to the instance axis (at ``leading``) of encoder_inputs[name]."""
    from mllm_jax import partitioning as part
    from mllm_jax.parallel.sharding import default_rules

    # No table given: the default encoder rules (the batch spread over every mesh axis that divides it).
    rules = dict(rule_table).get(f"encoders/{name}") if rule_table is not None else tuple(
        default_rules(f"encoders/{name}").items())
    names = (None,) * leading + ("batch",) + (None,) * (len(shape) - leading - 1)
    with jax.set_mesh(mesh), part.rules_scope(rules):
        spec = part.spec(names, shape)
    return P() if spec is None else spec


def batch_specs(batch: dict, mesh, *, leading: int, rule_table) -> dict:
    out = {}
    for key, value in batch.items():
        if key in ENCODER_KEYS:  # instance-major: raw inputs or cached features
            # A native-resolution modality's input is a dict of packed patch rows ([.., R, P, ...] each): every
            # array shards its row axis R like an instance axis.
            out[key] = {n: jax.tree.map(lambda a, n=n: encoder_spec(mesh, rule_table, n, a.shape, leading), x)
                        for n, x in value.items()}
        else:
            out[key] = jax.tree.map(lambda x: token_spec(mesh, x.shape, leading), value)
    return out


def put_batch(batch: dict, mesh, *, leading: int, rule_table=None) -> dict:
    """Global sharded arrays from this process's rows of a batch (all rows when there is one process).

    ``leading``: the position of the batch axis (1 for train batches [M, B, ...], 0 for eval batches [B, ...]).
    ``rule_table``: parallel.sharding.rule_table(model_config, parallel_config) (None: the default rules)."""
    if jax.process_count() == 1:
        specs = batch_specs(batch, mesh, leading=leading, rule_table=rule_table)
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), NamedSharding(mesh, s)), batch, specs,
                            is_leaf=lambda s: isinstance(s, P))
    # Several processes: stitch the hosts' rows along the batch axes, then lay out on device (an on-device reshard:
    # no host loads another host's rows).
    staged = distributed.global_batch(batch, mesh, P(*([None] * leading), _axis_entry(batch_axes(mesh))))
    specs = batch_specs(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), staged), mesh,
                        leading=leading, rule_table=rule_table)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    return jax.jit(lambda t: t, out_shardings=shardings)(staged)
