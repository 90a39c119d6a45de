"""One entry point for attention: ``kernels.attention``. It validates the shapes and owns every choice of
implementation: context parallelism (a mesh with a ``context`` axis > 1), then by backend and key count (``choose``):

    implementation  what                                             chosen when (impl="auto")
    dense           kernels.reference.head_major_attention           CPU, keys < TILED_MIN_KEYS
    tiled           kernels.tiled (only non-empty tiles, no S x S)   CPU, keys >= TILED_MIN_KEYS
    pallas_gpu      kernels.pallas_gpu.flash_attention (Triton)      GPU
    pallas_tpu      kernels.pallas_tpu.flash_attention (Mosaic)      TPU

``impl="xla"`` is dense/tiled as on CPU on every backend, except that off CPU dense runs up to DENSE_MAX_KEYS keys.
The tiled and Pallas paths index the batch (loops, grids), so on a mesh that shards the arrays they run per shard
under shard_map (kernels.sharding.per_shard); dense partitions like any einsum.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mllm_jax.kernels import sharding
from mllm_jax.kernels._common import traced_device
from mllm_jax.kernels.meta import TokenMeta, mask as mask_rule

IMPLS = ("auto", "xla", "dense", "tiled", "pallas_gpu", "pallas_tpu")

# Key counts where the implementation changes; both measured with forward + backward of attention layers, fp32.
#
# TILED_MIN_KEYS (CPU, impl "auto"/"xla"): from this many keys the tiled path, below it the dense head-major one.
#   On vlm_small's shapes (2 cores): the tiled path is 2.4x faster at 512 causal keys and 6x on packed rows with
#   padding, while at 197 keys with a full mask (the ViT) the dense one is 1.8x faster.
TILED_MIN_KEYS = 256
# DENSE_MAX_KEYS (impl "xla" off CPU): dense up to this many keys, tiled beyond. Below it the dense path was as fast as
#   the tiled one and simpler to differentiate; beyond it the [B, H, Sq, Sk] probabilities dominate memory.
DENSE_MAX_KEYS = 1024

_BACKEND_IMPL = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}


def check_shapes(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    b, sq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k batch/head_dim {k.shape[0]}/{k.shape[3]} do not match q's {b}/{d}")
    if hq % k.shape[2]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")
    for name, meta, want in (("q_meta", q_meta, (b, sq)), ("k_meta", k_meta, (b, k.shape[1]))):
        shapes = [tuple(np.shape(a)) for a in meta]
        if any(s != want for s in shapes):
            raise ValueError(f"{name} arrays must have shape {want} (batch, length of {name[0]}); got {shapes}")


def choose(impl: str, num_keys: int, backend: str | None = None) -> str:
    """The implementation ``attention`` runs (outside context parallelism): "dense", "tiled", "pallas_gpu" or
    "pallas_tpu", for ``impl`` and the number of keys on ``backend`` (default: jax's)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    backend = backend or mesh_backend() or jax.default_backend()
    if impl == "auto":
        impl = _BACKEND_IMPL.get(backend, "xla")
    if impl != "xla":
        return impl
    dense_max = TILED_MIN_KEYS - 1 if backend == "cpu" else DENSE_MAX_KEYS
    return "dense" if num_keys <= dense_max else "tiled"


def kernel_tile(impl: str, num_queries: int, num_keys: int, head_dim: int, backend: str | None = None,
                generation: str | None = None) -> tuple[int, int]:
    """(block_q, block_k): the tile the kernel ``choose(impl, num_keys, backend)`` computes on a call of
    ``num_queries`` x ``num_keys`` tokens with ``head_dim``, by default blocks (the kernels' block tables:
    pallas_tpu.blocks_for per TPU generation, pallas_gpu.default_blocks per GPU generation, kernels.tiled's
    default_block; dense attention is one tile). ``generation``: the TPU/GPU generation ("v5e", "h100"; default the
    running one's, else the kernel's default)."""
    name = choose(impl, num_keys, backend)
    if name == "pallas_tpu":
        from mllm_jax.kernels.pallas_tpu import blocks_for

        return blocks_for(num_queries, num_keys, head_dim, generation=generation)
    if name == "pallas_gpu":
        from mllm_jax.kernels.pallas_gpu import default_blocks

        return default_blocks(num_queries, num_keys, head_dim, generation)
    if name == "tiled":
        from mllm_jax.kernels._common import default_block

        return default_block(num_queries), default_block(num_keys)
    return num_queries, num_keys


def mesh_backend() -> str | None:
    """The platform of the devices of the mesh being traced for, when it says ("tpu", "gpu", "cpu"): a program
    compiled on a CPU host for a TPU target (--compile_only) chooses as on the target, not as on the host."""
    device = traced_device(from_mesh_only=True)
    return device.platform if device else None


def takes_mask(impl: str, num_keys: int, *, context_parallel: bool = True) -> bool:
    """Whether ``attention`` uses a dense ``mask=`` here (the dense path, not context-parallel): then a caller with
    many layers builds kernels.mask once per forward and passes it to each (no layer recomputes the rule)."""
    if context_parallel and sharding.context_mesh() is not None:
        return False
    return choose(impl, num_keys) == "dense"


def _kernel(name: str, *, interpret, block_q, block_k, **kw):
    if name == "tiled":
        from mllm_jax.kernels.tiled import tiled_attention

        return functools.partial(tiled_attention, block_q=block_q, block_k=block_k, **kw)
    if name == "pallas_gpu":
        from mllm_jax.kernels.pallas_gpu import flash_attention
    else:
        from mllm_jax.kernels.pallas_tpu import flash_attention
    return functools.partial(flash_attention, block_q=block_q, block_k=block_k, interpret=interpret, **kw)


def attention(
    q,
    k,
    v,
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    *,
    impl: str = "auto",
    interpret: bool = False,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    span_isolated: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    mask=None,
    context_parallel: bool = True,
    context_method: str = "allgather",
):
    """Masked multi-head attention. q [B, Sq, Hq, D], k and v [B, Sk, Hkv, D] -> [B, Sq, Hq, D].

    The mask is the rule of kernels.meta applied to q_meta and k_meta, which are given separately so any permutation
    of the tokens (context parallelism) is exact. Rows that attend nothing return 0.

    - ``mask``: the dense bool [B, Sq, Sk] rule (kernels.mask), used by the dense path when given (``takes_mask``).
    - ``context_parallel``: under a mesh whose ``context`` axis has size > 1 the sequences are sharded over it and
      kernels.context_parallel runs ``context_method`` ("allgather" or "ring"). Pass False where the sequence is not
      context-sharded (encoders, cross-attention).
    """
    check_shapes(q, k, v, q_meta, k_meta)
    kw = dict(scale=scale, window=window, softcap=softcap, span_isolated=span_isolated)
    chosen = choose(impl, k.shape[1])
    cp_mesh = sharding.context_mesh() if context_parallel else None
    if cp_mesh is not None:
        from mllm_jax.kernels.context_parallel import context_attention

        return context_attention(q, k, v, q_meta, k_meta, mesh=cp_mesh, axis="context", method=context_method,
                                 impl=impl, interpret=interpret, block_q=block_q, block_k=block_k, **kw)
    if chosen == "dense":
        from mllm_jax.kernels.reference import head_major_attention

        if mask is None:
            mask = mask_rule(q_meta, k_meta, window=window, span_isolated=span_isolated)
        return head_major_attention(q, k, v, mask, scale=scale, softcap=softcap)
    kernel = _kernel(chosen, interpret=interpret, block_q=block_q, block_k=block_k, **kw)
    mesh = sharding.kernel_mesh(pallas=chosen.startswith("pallas"))
    if mesh is None:
        return kernel(q, k, v, q_meta, k_meta)
    return sharding.per_shard(kernel, q, k, v, q_meta, k_meta, mesh)
