"""The pre-LN transformer tower shared by the vision (CLIP/ViT/SigLIP) and audio (Whisper) encoders.

Layer i: h += o(attn(ln1(h))); h += fc2(act(fc1(ln2(h)))), every token of an instance seeing every other one.
Parameters are stacked on a leading ``layers`` axis: layers/{ln1, attn/{q,k,v,o}, ln2, mlp/{fc1,fc2}}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.kernels.meta import TokenMeta
from mllm_jax import layers as L
from mllm_jax import partitioning as part
from mllm_jax.config import RunSettings

ENCODER_LORA_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


def full_meta(n: int, length: int) -> TokenMeta:
    """Metadata under which every token sees every other token of its row (one segment, one span)."""
    ones = jnp.ones((n, length), jnp.int32)
    return TokenMeta(jnp.zeros((n, length), jnp.int32), ones, ones)


class EncoderLayers(nnx.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_layers: int, *, rngs: nnx.Rngs, k_bias: bool = True,
                 lora_rank: int | None = None, lora_targets: tuple = ()):
        if d_model % n_heads:
            raise ValueError(f"encoder d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        hd = d_model // n_heads
        targets = set(lora_targets)

        def lin(name, ins, outs, in_names, out_names, bias=True):
            return L.Linear(ins, outs, in_names, out_names, rngs=rngs, bias=bias, stack=n_layers,
                            lora_rank=lora_rank if name in targets else None)

        self.ln1 = L.Norm(d_model, bias=True, stack=n_layers)
        self.attn = L.Group(
            q=lin("q", (d_model,), (n_heads, hd), ("embed",), ("heads", "head_dim")),
            k=lin("k", (d_model,), (n_heads, hd), ("embed",), ("heads", "head_dim"), bias=k_bias),
            v=lin("v", (d_model,), (n_heads, hd), ("embed",), ("heads", "head_dim")),
            o=lin("o", (n_heads, hd), (d_model,), ("heads", "head_dim"), ("embed",)),
        )
        self.ln2 = L.Norm(d_model, bias=True, stack=n_layers)
        self.mlp = L.Group(
            fc1=lin("fc1", (d_model,), (d_ff,), ("embed",), ("mlp",)),
            fc2=lin("fc2", (d_ff,), (d_model,), ("mlp",), ("embed",)),
        )


def apply_encoder_layers(module: EncoderLayers, x_NTD, n_run: int, *, act: str, eps: float, run: RunSettings):
    """Run the first ``n_run`` stacked layers (layers.scan_layers) on x [N, T, D]."""
    if n_run == 0:
        return x_NTD
    values, names = L.module_params(module)
    values = jax.tree.map(lambda a: a[:n_run], values)
    meta = full_meta(*x_NTD.shape[:2])
    dtype, lora_scale = L.dtype_of(run.dtype), run.lora_scale

    def body(p, h):
        p = L.use_params(p, names, dtype, drop_leading=True)
        a = L.self_attention(p["attn"], L.layer_norm(p["ln1"], h, eps), meta, lora_scale=lora_scale,
                             impl=run.attention_impl, context_parallel=False)
        h = h + a
        h = h + L.plain_mlp(p["mlp"], L.layer_norm(p["ln2"], h, eps), act, lora_scale=lora_scale)
        return part.constrain(h, ("batch", "length", "act_embed"))

    # The scan carry must enter with the layout the body returns (Explicit meshes type-check it): e.g. an input whose
    # features carry "fsdp" from an fsdp-sharded bias while the rule's batch leaves "fsdp" out.
    x = part.constrain(x_NTD.astype(dtype), ("batch", "length", "act_embed"))
    return L.scan_layers(body, x, values, run.remat, run.layer_loop)
