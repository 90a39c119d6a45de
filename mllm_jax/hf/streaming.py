"""Fill an nnx module's parameters from a HF checkpoint, tensor by tensor, straight into their target sharding.

The module is first built abstractly (``nnx.eval_shape``: shapes, dtypes and, under a mesh with logical rules, the
shardings its parameters would have). Each parameter is then created with ``jax.make_array_from_callback``: the
callback is asked only for the slices the local devices hold, and reads just the layers of the memory-mapped
safetensors that those slices need. Host memory peaks at about one parameter, never a copy per device.
Parameters that no rule covers (LoRA adapters) keep the module's own initialisation, computed under jit so the
random init of everything else is dead code that XLA removes.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mllm_jax.hf.safetensors_io import CheckpointReader
from mllm_jax.hf.weight_maps import Rule


def _path(p) -> str:
    return "/".join(str(x) for x in p)


def check_shapes(reader: CheckpointReader, rules: list[Rule], abstract_shapes: dict) -> None:
    """Every tensor exists with the shape the config implies; a ValueError names the tensor and both shapes."""
    for rule in rules:
        if rule.ours not in abstract_shapes:
            raise ValueError(f"weight map names parameter {rule.ours!r}, which the module does not have")
        shape = abstract_shapes[rule.ours]
        layer_shape = shape[1:] if rule.stacked else shape
        for name in rule.hf_names(shape[0] if rule.stacked else None):
            if name not in reader:
                raise ValueError(f"tensor {name!r} (for {rule.ours}) is missing from the checkpoint at "
                                 f"{reader.directory}")
            want, got = rule.hf_shape(layer_shape), reader.shape(name)
            if tuple(got) != tuple(want):
                raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(got)} does not match the shape the "
                                 f"config implies, {tuple(want)} (for our {rule.ours} {tuple(shape)})")


def _load_one(reader: CheckpointReader, rule: Rule, sds, sharding):
    shape, dtype = tuple(sds.shape), sds.dtype
    layer_shape = shape[1:] if rule.stacked else shape
    cache: dict = {}  # layer -> array in our layout; shared by the devices that hold the same slices

    def layer(i):
        if i not in cache:
            cache[i] = np.asarray(rule.read_layer(reader.get, i, layer_shape), dtype=dtype)
        return cache[i]

    def host_slice(index):
        if not rule.stacked:
            return layer(None)[index]
        layers = range(shape[0])[index[0]]
        return np.stack([layer(i)[index[1:]] for i in layers])

    if sharding is None:
        return jax.device_put(host_slice(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, host_slice)


def load_into(make_module, sources, *, mesh=None, logical_rules=None, init_missing=None):
    """Build ``make_module()`` with its parameters read from ``sources`` = [(CheckpointReader, [Rule, ...]), ...].

    ``mesh`` + ``logical_rules``: the module is traced under them (mllm_jax.partitioning) and each parameter lands
    in the sharding it would have been created with; without a mesh, on the default device. Parameters no rule
    covers keep the module's own initialisation when ``init_missing(path)`` says so (LoRA adapters always do);
    otherwise they are an error.
    """
    from mllm_jax import partitioning as part
    from mllm_jax.layers import LoRAParam

    def in_scope(fn):
        if mesh is None:
            return fn()
        with jax.set_mesh(mesh), part.rules_scope(logical_rules):
            return fn()

    abstract = in_scope(lambda: nnx.eval_shape(make_module))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    shapes = {_path(p): tuple(v.get_value().shape) for p, v in flat}
    by_path = {}
    for reader, rules in sources:
        check_shapes(reader, rules, shapes)
        by_path.update({r.ours: (reader, r) for r in rules})
    unmapped = {_path(p): v for p, v in flat if _path(p) not in by_path}
    bad = [k for k, v in unmapped.items() if not (isinstance(v, LoRAParam) or (init_missing and init_missing(k)))]
    if bad:
        raise ValueError(f"no checkpoint tensor maps to parameters {bad}")
    rest = _local_init(make_module, set(unmapped), in_scope) if unmapped else {}
    out = []
    for p, v in flat:
        key = _path(p)
        if key in by_path:
            sds = v.get_value()
            sharding = getattr(sds, "sharding", None)
            if mesh is not None:  # eval_shape's shardings live on the abstract mesh: bind them to the devices
                spec = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else None
                sharding = jax.sharding.NamedSharding(mesh, spec or jax.sharding.PartitionSpec())
            reader, rule = by_path[key]
            value = in_scope(lambda: _load_one(reader, rule, sds, sharding))
        else:
            value = rest[key]
        out.append((p, v.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _local_init(make_module, paths: set, in_scope) -> dict:
    def init():
        _, st = nnx.split(make_module())
        return {_path(p): v.get_value() for p, v in nnx.to_flat_state(st) if _path(p) in paths}

    return in_scope(lambda: jax.jit(init)())
