"""Building blocks shared by the LLM, the encoders and the projectors.

Two halves:
- parameter holders (``Linear``, ``Norm``): nnx Modules that only create annotated parameters, optionally stacked on
  a leading ``layers`` axis (``stack=L``) so a whole tower is one set of arrays applied with ``lax.scan``;
- pure functions (``linear``, ``rms_norm``, ``self_attention``, ...) over plain dicts of arrays, so a layer is a pure
  function ``(params, x, meta) -> x`` that scan, remat and the pipeline can call directly.

Parameter layouts (HF import maps onto these): a projection's kernel is [in..., out...] with heads split out
(q: [D, H, Dh], o: [H, Dh, D]); LayerNorm/RMSNorm have ``scale`` (and ``bias``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax import kernels, partitioning as part
from mllm_jax.kernels.sharding import sharded_mesh
from mllm_jax.config import RopeScaling


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: trainable even when the module it adapts is frozen."""


# --------------------------------------------------------------------------------------------------------------------
# Parameter holders


class Group(nnx.Module):
    """A named bundle of submodules/parameters (gives readable paths: layers/attn/q/kernel)."""

    def __init__(self, **children):
        for k, v in children.items():
            setattr(self, k, v)


class Linear(nnx.Module):
    """kernel [*in_shape, *out_shape] (+ bias [*out_shape]); with ``stack`` a leading ``layers`` axis on each.

    ``lora_rank`` adds ``lora_a`` [*in_shape, r] and ``lora_b`` [r, *out_shape] (zero: LoRA starts as the identity).
    """

    def __init__(
        self,
        in_shape: tuple,
        out_shape: tuple,
        in_names: tuple,
        out_names: tuple,
        *,
        rngs: nnx.Rngs,
        bias: bool = True,
        stack: int | None = None,
        init_std: float | None = None,
        lora_rank: int | None = None,
    ):
        lead = (stack,) if stack else ()
        lead_names = ("layers",) if stack else ()
        fan_in = math.prod(in_shape)
        std = init_std if init_std is not None else fan_in**-0.5
        k = std * jax.random.normal(rngs.params(), lead + tuple(in_shape) + tuple(out_shape), jnp.float32)
        self.kernel = part.param(k, lead_names + tuple(in_names) + tuple(out_names))
        if bias:
            self.bias = part.param(jnp.zeros(lead + tuple(out_shape), jnp.float32), lead_names + tuple(out_names))
        if lora_rank:
            a = fan_in**-0.5 * jax.random.normal(rngs.params(), lead + tuple(in_shape) + (lora_rank,), jnp.float32)
            self.lora_a = part.param(a, lead_names + tuple(in_names) + ("lora_rank",), LoRAParam)
            b = jnp.zeros(lead + (lora_rank,) + tuple(out_shape), jnp.float32)
            self.lora_b = part.param(b, lead_names + ("lora_rank",) + tuple(out_names), LoRAParam)


class Norm(nnx.Module):
    """RMSNorm (scale) or LayerNorm (scale, bias) parameters over the last axis (optionally stacked)."""

    def __init__(self, dim: int, *, bias: bool, stack: int | None = None, init: float = 1.0, names=("embed",)):
        lead = (stack,) if stack else ()
        lead_names = ("layers",) if stack else ()
        self.scale = part.param(jnp.full(lead + (dim,), init, jnp.float32), lead_names + tuple(names))
        if bias:
            self.bias = part.param(jnp.zeros(lead + (dim,), jnp.float32), lead_names + tuple(names))


# --------------------------------------------------------------------------------------------------------------------
# Using parameters


def module_params(module: nnx.Module) -> tuple[dict, dict]:
    """(pure dict of arrays, matching dict of logical names) of a module's parameters, for the pure functions."""
    state = nnx.state(module, nnx.Param)
    return nnx.to_pure_dict(state), nnx.to_pure_dict(part.variable_names(state))


def use_params(values: dict, names: dict, dtype, *, drop_leading: bool = False) -> dict:
    """Parameters ready for compute: FSDP-gathered and cast to the compute dtype (norm math upcasts itself).

    ``drop_leading``: the arrays are one layer sliced out of a stack, so their names lose the ``layers`` axis.
    """

    def one(x, n):
        if n is not None:
            x = part.gathered(x, tuple(n[1:]) if drop_leading else tuple(n))
        return x.astype(dtype)

    return jax.tree.map(one, values, names, is_leaf=lambda n: n is None or isinstance(n, tuple))


def params_for_compute(module: nnx.Module, dtype=jnp.float32) -> dict:
    """A (non-stacked) module's parameters, gathered and cast, as a pure dict."""
    values, names = module_params(module)
    return use_params(values, names, dtype)


# --------------------------------------------------------------------------------------------------------------------
# Pure functions


def matmul_split(eq: str) -> tuple[str, str, str] | None:
    """(lead, contracted, kept) when ``eq`` is x[lead + contracted] . w[contracted + kept] -> out[lead + kept], i.e.
    one 2-d matmul after reshapes (every projection here: 'bsd,dhk->bshk', 'bshk,hkd->bsd', ...); else None."""
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    contracted = "".join(c for c in xs if c in ws)
    lead, kept = xs[: len(xs) - len(contracted)], ws[len(contracted):]
    if xs != lead + contracted or ws != contracted + kept or out != lead + kept or not lead or not contracted:
        return None
    return lead, contracted, kept


def project(eq: str, x, w, out_names: tuple, **kw):
    """jnp.einsum(eq, x, w) laid out as ``out_names`` on the mesh (``kw``: e.g. preferred_element_type)."""
    (xs, ws), out = eq.split("->")[0].split(","), eq.split("->")[1]
    sizes = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
    out_shape = tuple(sizes[c] for c in out)
    split = matmul_split(eq)
    if split is not None and _unsharded_mesh():
        # Whole arrays: one [rows, in] x [in, out] matmul. On CPU a 3-d einsum's weight gradient contracts two axes
        # (batch, length), which XLA lays out with a transpose of the activation gradient: the gated MLP's
        # forward + backward runs 1.2-1.3x slower as 'bsd,df->bsf' than as this (benchmarks/RESULTS.md).
        lead, contracted, _ = split
        rows, inner = math.prod(x.shape[: len(lead)]), math.prod(x.shape[len(lead):])
        y = jnp.matmul(x.reshape(rows, inner), w.reshape(inner, -1), **kw)
        return y.reshape(out_shape)
    sh = part.out_sharding(out_names, out_shape)
    return jnp.einsum(eq, x, w, out_sharding=sh, **kw) if sh is not None else jnp.einsum(eq, x, w, **kw)


def linear(p: dict, x, eq: str, out_names: tuple, *, lora_scale: float = 0.0):
    """x @ kernel (+ bias) (+ lora_scale * x @ a @ b), with ``eq`` the einsum of x and the kernel, e.g. 'bsd,dhk->bshk'.

    ``out_names`` are the logical names of the output, used as its layout on a mesh.
    """
    y = project(eq, x, p["kernel"], out_names)
    if "lora_a" in p:
        lhs, out = eq.split("->")
        xs, ks = lhs.split(",")
        contracted = "".join(c for c in ks if c in xs)
        kept = "".join(c for c in ks if c not in xs)
        xr = "".join(c for c in xs if c not in contracted) + "r"
        mid = project(f"{xs},{contracted}r->{xr}", x, p["lora_a"], tuple(out_names[: len(xr) - 1]) + (None,))
        y = y + lora_scale * project(f"{xr},r{kept}->{out}", mid, p["lora_b"], out_names)
    if "bias" in p:
        y = y + p["bias"]
    return y


def rms_norm(p: dict, x, eps: float, *, plus_one: bool = False):
    """RMSNorm in float32 (Llama: weight * normed cast back; Gemma: normed * (1 + weight))."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = p["scale"].astype(jnp.float32)
    if plus_one:
        return (normed * (1.0 + scale)).astype(x.dtype)
    return (normed.astype(x.dtype) * scale.astype(x.dtype)).astype(x.dtype)


def layer_norm(p: dict, x, eps: float):
    """LayerNorm in float32 (biased variance, as torch.nn.LayerNorm)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def activation(name: str):
    fns = {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }
    if name not in fns:
        raise ValueError(f"activation must be one of {sorted(fns)}; got {name!r}")
    return fns[name]


# ---- RoPE (HF 'rotate_half' layout: the two halves of head_dim are the real and imaginary parts)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), with Llama-3 frequency scaling when given."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BS, inv_freq: np.ndarray):
    """cos, sin [B, S, 1, head_dim] (float32) at the tokens' global positions (never an arange)."""
    freqs = positions_BS.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def mrope_cos_sin(rope_positions_BS3, inv_freq: np.ndarray, section: tuple):
    """M-RoPE (Qwen2-VL, HF apply_multimodal_rotary_pos_emb): cos, sin [B, S, 1, head_dim]. The frequencies are cut
    into consecutive sections of sizes ``section``; section i rotates by axis i % 3 (temporal, height, width) of the
    tokens' rope positions. Equal positions on the three axes give exactly 1-D RoPE."""
    if sum(section) != len(inv_freq):
        raise ValueError(f"mrope_section {tuple(section)} must sum to head_dim / 2 = {len(inv_freq)}; got "
                         f"{sum(section)}")
    axis_F = np.repeat(np.arange(len(section)) % 3, section)  # the position axis of each frequency
    pos_BSF = jnp.take(rope_positions_BS3, jnp.asarray(axis_F), axis=-1).astype(jnp.float32)
    freqs = pos_BSF * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def apply_rope(x_BSHD, cos, sin):
    half = x_BSHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BSHD[..., half:], x_BSHD[..., :half]], axis=-1)
    return (x_BSHD.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BSHD.dtype)


# ---- Attention: kernels.attention owns every choice of implementation (backend, key count, mesh)


def _unsharded_mesh() -> bool:
    """No mesh, or every axis that is not manual (shard_map) has size 1: the arrays are whole on this device."""
    return sharded_mesh() is None




def self_attention(p: dict, x_BSD, meta, *, rope=None, lora_scale=0.0, qk_norm_eps=None, qk_norm_plus_one=False,
                   **attention_kw):
    """Projections q/k/v/o around kernels.attention; ``rope`` = (cos, sin) or None (encoders). ``qk_norm_eps``:
    RMSNorm over head_dim of q and k before RoPE (Qwen3, Gemma 3: parameters q_norm / k_norm; Gemma's weight is
    applied as (1 + w): ``qk_norm_plus_one``)."""
    q = linear(p["q"], x_BSD, "bsd,dhk->bshk", ("batch", "length", "heads", "head_dim"), lora_scale=lora_scale)
    k = linear(p["k"], x_BSD, "bsd,dhk->bshk", ("batch", "length", "kv_heads", "head_dim"), lora_scale=lora_scale)
    v = linear(p["v"], x_BSD, "bsd,dhk->bshk", ("batch", "length", "kv_heads", "head_dim"), lora_scale=lora_scale)
    if qk_norm_eps is not None:
        q = rms_norm(p["q_norm"], q, qk_norm_eps, plus_one=qk_norm_plus_one)
        k = rms_norm(p["k_norm"], k, qk_norm_eps, plus_one=qk_norm_plus_one)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = kernels.attention(q, k, v, meta, meta, **attention_kw)
    return linear(p["o"], out, "bshk,hkd->bsd", ("batch", "length", "act_embed"), lora_scale=lora_scale)


def gated_mlp(p: dict, x_BSD, act: str, *, lora_scale=0.0):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) / GeGLU (gelu_tanh)."""
    names = ("batch", "length", "mlp")
    g = linear(p["gate"], x_BSD, "bsd,df->bsf", names, lora_scale=lora_scale)
    u = linear(p["up"], x_BSD, "bsd,df->bsf", names, lora_scale=lora_scale)
    h = activation(act)(g) * u
    return linear(p["down"], h, "bsf,fd->bsd", ("batch", "length", "act_embed"), lora_scale=lora_scale)


def plain_mlp(p: dict, x_BSD, act: str, *, lora_scale=0.0):
    """fc2(act(fc1(x))): the encoders' and projectors' MLP."""
    h = linear(p["fc1"], x_BSD, "bsd,df->bsf", ("batch", "length", "mlp"), lora_scale=lora_scale)
    return linear(p["fc2"], activation(act)(h), "bsf,fd->bsd", ("batch", "length", "act_embed"),
                  lora_scale=lora_scale)


def remat_policy(name: str):
    """(wrap?, policy) for ModelConfig.remat."""
    policies = {
        "none": (False, None),
        "full": (True, None),
        "dots": (True, jax.checkpoint_policies.dots_saveable),
        "dots_no_batch": (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    }
    if name not in policies:
        raise ValueError(f"remat must be one of {sorted(policies)}; got {name!r}")
    return policies[name]


LAYER_LOOPS = ("scan", "unrolled")


def check_layer_loop(loop: str) -> None:
    if loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}; got {loop!r}")


def scan_layers(body, h, stacked: dict, remat: str = "none", loop: str = "scan", *, has_aux: bool = False):
    """h <- body(layer_params, h) for each layer of ``stacked`` (arrays with a leading layers axis).

    ``has_aux``: body returns (h, y) and the result is (h, ys stacked over the layers) (y may be None).

    ``loop="scan"``: one lax.scan (compile time independent of depth). ``"unrolled"``: a Python loop over the layers;
    the backward then reads each layer's residuals from its own buffers instead of slicing them out of [layers, ...]
    stacks the forward wrote (and zero-filled) slice by slice: on one CPU device the vlm_small train step runs about
    1.15x faster (benchmarks/RESULTS.md), for a compile time that grows with depth.
    """
    check_layer_loop(loop)
    wrap, policy = remat_policy(remat)
    if wrap:
        # prevent_cse: lax.scan already keeps XLA from merging the recomputed forward with the original one; an
        # unrolled loop needs the barriers, or the TPU compiler CSEs the recompute away and remat saves nothing.
        body = jax.checkpoint(body, policy=policy, prevent_cse=(loop == "unrolled"))
    if loop == "unrolled":
        ys = []
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            out = body(jax.tree.map(lambda a, i=i: a[i], stacked), h)
            h, y = out if has_aux else (out, None)
            ys.append(y)
        if not has_aux:
            return h
        return h, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))

    def step(carry, layer_params):
        out = body(layer_params, carry)
        return out if has_aux else (out, None)

    h, ys = jax.lax.scan(step, h, stacked)
    return (h, ys) if has_aux else h


def dtype_of(name: str):
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}; got {name!r}")
    return dtypes[name]
