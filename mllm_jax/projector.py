"""Projectors from encoder features [N, T, D_enc] to LLM embeddings [N, T', D_llm].

- "linear": one Linear (+ bias);
- "mlp": fc1, activation, fc2 (LLaVA's multi_modal_projector linear_1 / linear_2);
- "resampler": ``num_queries`` learned queries cross-attending to the encoder tokens (Perceiver / Q-Former style,
  pre-LN blocks), so T' = num_queries whatever T is;
- "gemma3": Gemma 3's multi_modal_projector: the square patch grid average-pooled to ``tokens_per_image`` tokens,
  RMSNorm with (1 + w) (mm_soft_emb_norm), one Linear without bias (mm_input_projection_weight);
- "patch_merger": Qwen2-VL's merger: ln_q (LayerNorm or RMSNorm, ``norm``), each ``merge_size**2`` consecutive
  patches concatenated (the native-resolution rows hold them merge-group major), fc1, GELU, fc2: T' = T / m^2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax import kernels, layers as L
from mllm_jax import partitioning as part
from mllm_jax.config import ProjectorConfig, RunSettings
from mllm_jax.encoder import full_meta

KINDS = ("linear", "mlp", "resampler", "gemma3", "patch_merger")
MERGER_NORMS = ("layer", "rms")


class Projector(nnx.Module):
    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int, *, rngs: nnx.Rngs,
                 run: RunSettings = RunSettings()):
        cfg = config
        if cfg.kind not in KINDS:
            raise ValueError(f"ProjectorConfig.kind must be one of {KINDS}; got {cfg.kind!r}")
        L.check_layer_loop(run.layer_loop)
        self.config = cfg
        self.run = run
        io = (("embed_in",), ("embed",))
        if cfg.kind == "linear":
            self.proj = L.Linear((in_dim,), (out_dim,), *io, rngs=rngs)
        elif cfg.kind == "mlp":
            hidden = cfg.hidden_dim or out_dim
            self.mlp = L.Group(fc1=L.Linear((in_dim,), (hidden,), ("embed_in",), ("mlp",), rngs=rngs),
                               fc2=L.Linear((hidden,), (out_dim,), ("mlp",), ("embed",), rngs=rngs))
        elif cfg.kind == "patch_merger":
            if cfg.norm not in MERGER_NORMS:
                raise ValueError(f"patch_merger: ProjectorConfig.norm must be one of {MERGER_NORMS}; got {cfg.norm!r}")
            merged = in_dim * cfg.merge_size**2
            hidden = cfg.hidden_dim or merged
            self.norm = L.Norm(in_dim, bias=cfg.norm == "layer", names=("embed_in",))
            self.mlp = L.Group(fc1=L.Linear((merged,), (hidden,), ("embed_in",), ("mlp",), rngs=rngs),
                               fc2=L.Linear((hidden,), (out_dim,), ("mlp",), ("embed",), rngs=rngs))
        elif cfg.kind == "gemma3":
            # (1 + w) norm: zero init is the identity scale, as in HF.
            self.norm = L.Norm(in_dim, bias=False, init=0.0, names=("embed_in",))
            self.proj = L.Linear((in_dim,), (out_dim,), *io, rngs=rngs, bias=False)
        else:
            if out_dim % cfg.n_heads:
                raise ValueError(f"resampler: LLM d_model ({out_dim}) must be divisible by n_heads ({cfg.n_heads})")
            d, nl, hd = out_dim, cfg.n_layers, out_dim // cfg.n_heads
            self.in_proj = L.Linear((in_dim,), (d,), *io, rngs=rngs)
            self.queries = part.param(0.02 * jax.random.normal(rngs.params(), (cfg.num_queries, d)),
                                      ("queries", "embed"))
            lin = lambda ins, outs, i_n, o_n: L.Linear(ins, outs, i_n, o_n, rngs=rngs, stack=nl)  # noqa: E731
            self.blocks = L.Group(
                q_norm=L.Norm(d, bias=True, stack=nl),
                kv_norm=L.Norm(d, bias=True, stack=nl),
                attn=L.Group(q=lin((d,), (cfg.n_heads, hd), ("embed",), ("heads", "head_dim")),
                             k=lin((d,), (cfg.n_heads, hd), ("embed",), ("heads", "head_dim")),
                             v=lin((d,), (cfg.n_heads, hd), ("embed",), ("heads", "head_dim")),
                             o=lin((cfg.n_heads, hd), (d,), ("heads", "head_dim"), ("embed",))),
                mlp_norm=L.Norm(d, bias=True, stack=nl),
                mlp=L.Group(fc1=lin((d,), (4 * d,), ("embed",), ("mlp",)),
                            fc2=lin((4 * d,), (d,), ("mlp",), ("embed",))),
            )
            self.out_norm = L.Norm(d, bias=True)

    def __call__(self, x_NTD):
        cfg = self.config
        dtype = L.dtype_of(self.run.dtype)
        x_NTD = x_NTD.astype(dtype)
        if cfg.kind == "linear":
            p = L.params_for_compute(self.proj, dtype)
            return L.linear(p, x_NTD, "btd,de->bte", ("batch", "length", "act_embed"))
        if cfg.kind == "mlp":
            return L.plain_mlp(L.params_for_compute(self.mlp, dtype), x_NTD, cfg.activation)
        if cfg.kind == "gemma3":
            x_NTD = L.rms_norm(L.params_for_compute(self.norm), pool_patch_grid(x_NTD, cfg), cfg.norm_eps,
                               plus_one=True)
            return L.linear(L.params_for_compute(self.proj, dtype), x_NTD, "btd,de->bte",
                            ("batch", "length", "act_embed"))
        if cfg.kind == "patch_merger":
            return self._merge(x_NTD, dtype)
        return self._resample(x_NTD, dtype)

    def _merge(self, x_NTD, dtype):
        cfg = self.config
        n, t, d = x_NTD.shape
        m2 = cfg.merge_size**2
        if t % m2:
            raise ValueError(f"patch_merger: {t} patches per row is not a multiple of merge_size**2 = {m2}")
        p = L.params_for_compute(self.norm)
        x = L.layer_norm(p, x_NTD, cfg.norm_eps) if cfg.norm == "layer" else L.rms_norm(p, x_NTD, cfg.norm_eps)
        x = part.reshape(x, (n, t // m2, m2 * d), ("batch", "length", "act_embed"))
        return L.plain_mlp(L.params_for_compute(self.mlp, dtype), x, cfg.activation)

    def _resample(self, x_NTD, dtype):
        cfg = self.config
        n, t, _ = x_NTD.shape
        kv = L.linear(L.params_for_compute(self.in_proj, dtype), x_NTD, "btd,de->bte", ("batch", "length", "act_embed"))
        q0 = part.gathered(self.queries[...], ("queries", "embed")).astype(dtype)
        h = part.constrain(jnp.broadcast_to(q0[None], (n,) + q0.shape), ("batch", "length", "act_embed"))
        q_meta, k_meta = full_meta(n, cfg.num_queries), full_meta(n, t)
        values, names = L.module_params(self.blocks)
        impl = self.run.attention_impl

        def body(p, h):
            p = L.use_params(p, names, dtype, drop_leading=True)
            a, c = p["attn"], L.layer_norm(p["kv_norm"], kv, 1e-5)
            hq = L.layer_norm(p["q_norm"], h, 1e-5)
            q = L.linear(a["q"], hq, "bsd,dhk->bshk", ("batch", "length", "heads", "head_dim"))
            k = L.linear(a["k"], c, "bsd,dhk->bshk", ("batch", "length", "heads", "head_dim"))
            v = L.linear(a["v"], c, "bsd,dhk->bshk", ("batch", "length", "heads", "head_dim"))
            o = kernels.attention(q, k, v, q_meta, k_meta, impl=impl, context_parallel=False)  # cross-attention
            h = h + L.linear(a["o"], o, "bshk,hkd->bsd", ("batch", "length", "act_embed"))
            h = h + L.plain_mlp(p["mlp"], L.layer_norm(p["mlp_norm"], h, 1e-5), cfg.activation)
            return h

        h = L.scan_layers(body, h, values, loop=self.run.layer_loop)
        return L.layer_norm(L.params_for_compute(self.out_norm), h, 1e-5)


def pool_patch_grid(x_NTD, cfg: ProjectorConfig):
    """[N, P*P, D] patches (row-major grid, as the vision tower emits them) -> [N, t*t, D], each output token the mean
    of a k x k block of patches (t * t = cfg.tokens_per_image, k = P / t): HF Gemma 3's AvgPool2d(k, stride=k)."""
    n, T, d = x_NTD.shape
    cfg.output_tokens(T)  # refuses a grid that does not pool evenly to tokens_per_image
    P, t = math.isqrt(T), math.isqrt(cfg.tokens_per_image)
    k = P // t
    x = part.reshape(x_NTD, (n, t, k, t, k, d), ("batch", None, None, None, None, "act_embed"))
    x = jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(x_NTD.dtype)  # the mean in float32 whatever the dtype
    return part.reshape(x, (n, t * t, d), ("batch", "length", "act_embed"))
