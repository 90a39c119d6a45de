"""Pieces shared by the attention kernels (tiled, pallas_gpu, pallas_tpu).

- ``config_type``: the static configuration tuple of a kernel: the six fields every kernel has (tile sizes and the
  mask/logit options), then the kernel's own extras. A NamedTuple: hashable, so it keys an lru_cache or serves as a
  nondiff argument of a custom_vjp.
- ``config_fields``: those six fields normalised from the public keyword arguments.
- ``check_*``: the argument refusals the kernels share, with their messages.
- ``per_config_vjp``: the per-configuration custom_vjp wrapper over (q, k, v, q_meta, k_meta).
- ``traced_device``: the device a program is being traced for (platform and device kind), which picks the kernel and
  its blocks: the mesh's device when it says, so a compile for a target from a CPU host chooses as on the target.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

DEFAULT_BLOCK = 128

_FIELDS = (
    ("block_q", int),
    ("block_k", int),
    ("scale", float),
    ("window", "int | None"),
    ("softcap", "float | None"),
    ("span_isolated", bool),
)


class DeviceKind(NamedTuple):
    platform: str  # "tpu", "gpu", "cpu"
    kind: str  # jax's device_kind, lower case: "tpu v5 lite", "nvidia h100 80gb hbm3", "cpu"


def traced_device(from_mesh_only: bool = False) -> DeviceKind | None:
    """The device the program being traced runs on: the abstract mesh's device when a mesh with one is set (a
    program compiled on a CPU host for a TPU or GPU target: its topology's devices), else jax's first device (None
    with ``from_mesh_only``, or when there is no backend at all)."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    if device is None and not from_mesh_only:
        try:
            device = jax.devices()[0]
        except Exception:  # noqa: BLE001 - no backend at all
            return None
    if device is None:
        return None
    return DeviceKind(str(device.platform), str(device.device_kind).lower())


# jax's device_kind -> generation, first match wins: "TPU v5 lite" is v5e and "TPU v5" (v5p's kind) v5p.
_TPU_KINDS = (("v6", "v6e"), ("v5p", "v5p"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4"))
_GPU_KINDS = (("h200", "h200"), ("h100", "h100"), ("a100", "a100"))
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def traced_generation() -> str | None:
    """The generation of ``traced_device()`` ("v4", "v5e", "v5p", "v6e", "a100", "h100", "h200"); None on a CPU,
    without a backend, or for a chip none of these names (each kernel then takes its default blocks)."""
    device = traced_device()
    if device is None:
        return None
    table = _TPU_KINDS if device.platform == "tpu" else _GPU_KINDS if device.platform in _GPU_PLATFORMS else ()
    return next((gen for token, gen in table if token in device.kind), None)


def config_type(name: str, **extra):
    """A NamedTuple type with the shared fields (block_q, block_k, scale, window, softcap, span_isolated) first,
    then ``extra`` (field name -> type), in order."""
    return NamedTuple(name, [*_FIELDS, *extra.items()])


def config_fields(block_q, block_k, head_dim, scale, window, softcap, span_isolated) -> dict:
    """The shared fields: scale defaults to head_dim ** -0.5; window and softcap stay None or become int / float.
    The block sizes are taken as given (each kernel chooses and checks its own)."""
    return dict(
        block_q=block_q,
        block_k=block_k,
        scale=float(head_dim**-0.5 if scale is None else scale),
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        span_isolated=bool(span_isolated),
    )


def default_block(length: int) -> int:
    """DEFAULT_BLOCK, or the length rounded up to a multiple of 8 when it is shorter (no wasted padding)."""
    return min(DEFAULT_BLOCK, -(-length // 8) * 8)


def check_positive_int(name, val):
    if val is not None and (int(val) != val or val < 1):
        raise ValueError(f"{name} must be a positive integer; got {val!r}")


def check_softcap(softcap):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive; got {softcap!r}")


def check_gqa(hq, hkv):
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def per_config_vjp(rules):
    """Decorator: ``rules(cfg) -> (fwd, bwd)`` becomes a cached ``cfg -> attn``, where attn(q, k, v, q_meta, k_meta)
    is a jax.custom_vjp whose primal output is ``fwd(...)[0]`` and whose rules are fwd / bwd."""

    @functools.lru_cache(maxsize=None)
    def make(cfg):
        fwd, bwd = rules(cfg)

        @jax.custom_vjp
        def attn(q, k, v, q_meta, k_meta):
            return fwd(q, k, v, q_meta, k_meta)[0]

        attn.defvjp(fwd, bwd)
        return attn

    return functools.update_wrapper(make, rules)
