"""Context parallelism on the host: plan each batch's token blocks over the `context` ranks and permute it.

Labels are next-token targets already shifted in the original order (mllm_jax.data.batching,
mllm_jax.data.datasets), and the loss is normalised by the global label count, so the permuted batch has exactly the
original loss. Every token array of the batch (including feature_index) moves with the same permutation; encoder
inputs are not token-aligned and stay.
"""

from __future__ import annotations

import math

import numpy as np

from mllm_jax.kernels.dispatch import choose, kernel_tile
from mllm_jax.kernels.meta import TokenMeta
from mllm_jax.parallel import context as cp_lib
from mllm_jax.parallel.config import AUTO

TOKEN_KEYS = ("input_ids", "labels", "positions", "segment_ids", "span_ids")
# Token arrays with a trailing axis ([.., B, S, 3]: M-RoPE positions), moved with the tokens when the batch has them.
TRAILING_TOKEN_KEYS = ("rope_positions",)


def _rows(x: np.ndarray, leading: int) -> np.ndarray:
    """[..lead.., B, S, ...] -> [(lead * B), S, ...]."""
    x = np.asarray(x)
    return x.reshape((-1,) + x.shape[leading + 1:])


def cost_model_for(llm_config, *, block: int, tile_k: int) -> cp_lib.CostModel:
    """The planner's block costs (alpha per non-empty ``block`` x ``tile_k`` tile: pass the counted tile's rows as
    ``block``; beta per token) from the trained LLM's
    shapes (LLMConfig: d_model, d_ff, heads, kv heads, head dim; gated MLP) instead of the Llama-3-8B default."""
    head_dim = llm_config.head_dim or llm_config.d_model // llm_config.n_heads
    return cp_lib.CostModel(d_model=llm_config.d_model, d_ff=llm_config.d_ff, n_heads=llm_config.n_heads,
                            n_kv_heads=llm_config.n_kv_heads, head_dim=head_dim, gated_mlp=True, tile_q=block,
                            tile_k=tile_k)


def _kernel_tile(cc, shard: int, keys: int, head_dim: int, attention_impl: str, backend, generation):
    """The tile of the kernel a context rank runs on a ``shard`` of queries against ``keys`` keys: the ring steps
    with the accelerator kernel, else kernels.tiled; the all-gather attends its q shard to every key."""
    impl = attention_impl
    if cc.attention == "ring" and choose(impl, keys, backend) not in ("pallas_tpu", "pallas_gpu"):
        impl = "tiled"  # the ring's per-step kernel off the accelerators (kernels.context_parallel._ring_kernel)
    return kernel_tile(impl, shard, keys, head_dim, backend, generation)


def context_block(parallel_config, seq_len: int, head_dim: int = 128, attention_impl: str | None = None,
                  backend: str | None = None, generation: str | None = None) -> int:
    """The planner block of ``ParallelConfig.context_config`` for sequences of ``seq_len`` tokens: its int, or for
    "auto" ``parallel.context.auto_block`` on the tile of the kernel the context attention runs (``attention_impl``,
    None: "auto", on ``backend`` and ``generation``: default the running ones; a compile for a target passes the
    target's) for the unpadded shard. The one place "auto" is resolved: the host's permutation, decode's prefill
    and train.compile_target's padded shapes all call it with the same static config."""
    cc, cp = parallel_config.context_config, parallel_config.context
    if cc.block != AUTO:
        return cc.block
    shard = -(-seq_len // cp)
    keys = shard if cc.attention == "ring" else seq_len
    tile_q, tile_k = _kernel_tile(cc, shard, keys, head_dim, attention_impl or "auto", backend, generation)
    return cp_lib.auto_block(seq_len, cp, cc.mode, tile_q, tile_k)


def head_dim_of(llm_config) -> int:
    """The attention head dim the kernel tile is chosen for (128 without a model config)."""
    return 128 if llm_config is None else (llm_config.head_dim or llm_config.d_model // llm_config.n_heads)


def planner_tile(parallel_config, seq_len: int, head_dim: int, attention_impl: str, backend: str | None = None,
                 generation: str | None = None) -> tuple[int, int]:
    """(tile_q, tile_k) the planner counts: the tile of the attention kernel each context rank runs on the platform
    (kernels.dispatch.kernel_tile: the ring steps a q shard against a K/V shard with the accelerator kernel, else
    kernels.tiled; the all-gather attends a q shard to every key), for the shard and key lengths of the plan's
    padded sequence. parallel.context.plan counts these tiles on each rank's permuted shard whatever
    ``ContextConfig.block`` is (a tile larger than the block is made of several blocks)."""
    cc, cp = parallel_config.context_config, parallel_config.context
    block = context_block(parallel_config, seq_len, head_dim, attention_impl, backend, generation)
    padded = cp_lib.padded_length(seq_len, cp, cc.mode, block)
    shard = padded // cp
    keys = shard if cc.attention == "ring" else padded
    return _kernel_tile(cc, shard, keys, head_dim, attention_impl, backend, generation)


def permute_for_context(batch: dict, parallel_config, *, leading: int, llm_config=None, attention_impl=None,
                        backend: str | None = None, generation: str | None = None
                        ) -> tuple[dict, "cp_lib.ContextPlan"]:
    """(the batch permuted by a plan of ``ParallelConfig.context_config`` over ``ParallelConfig.context`` ranks, the
    plan). ``leading`` = number of axes before the batch axis (1 for [M, B, S] train batches, 0 for eval).
    ``llm_config``: the trained model's LLMConfig, whose shapes cost the blocks (``cost_model_for``); None keeps the
    Llama-3-8B layer of parallel.cost_model.CostModel. ``attention_impl`` (ModelConfig.attention_impl): count the
    tiles of the kernel it resolves to on ``backend`` (default jax's) and ``generation`` (``planner_tile``); None
    keeps block x 32 tiles. ``ContextConfig.block = "auto"`` is resolved by ``context_block`` for the batch's
    sequence length on that kernel (None: the "auto" impl's)."""
    cc = parallel_config.context_config
    head_dim = head_dim_of(llm_config)
    block = context_block(parallel_config, np.shape(batch["input_ids"])[-1], head_dim, attention_impl, backend,
                          generation)
    lead_shape = np.shape(batch["input_ids"])[:leading]
    moved = TOKEN_KEYS + tuple(k for k in TRAILING_TOKEN_KEYS if batch.get(k) is not None)
    flat = {k: _rows(batch[k], leading) for k in moved}
    flat["feature_index"] = {n: _rows(v, leading) for n, v in (batch.get("feature_index") or {}).items()}
    meta = TokenMeta(flat["positions"], flat["segment_ids"], flat["span_ids"])
    if attention_impl is None:  # Cornstarch's key tiles of 32 tokens, or the largest that divides a small block
        tile_q, tile_k = block, math.gcd(block, 32)
    else:
        tile_q, tile_k = planner_tile(parallel_config, meta.segment_ids.shape[1], head_dim, attention_impl, backend,
                                      generation)
    cost_model = None if llm_config is None else cost_model_for(llm_config, block=tile_q, tile_k=tile_k)
    plan = cp_lib.plan(meta, parallel_config.context, mode=cc.mode, block=block, tile_k=tile_k, tile_q=tile_q,
                       method=cc.attention, cost_model=cost_model)
    permuted = cp_lib.permute_batch(flat, plan)

    def back(x):  # [(lead * B), S'] -> [..lead.., B, S']
        return x.reshape(lead_shape + (-1,) + x.shape[1:])

    out = dict(batch)
    for k in moved:
        out[k] = back(permuted[k])
    if "feature_index" in batch:
        out["feature_index"] = {n: back(v) for n, v in permuted["feature_index"].items()}
    return out, plan
