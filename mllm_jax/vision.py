"""Vision towers from NHWC pixels: CLIP (class token, pre_layrnorm, quick_gelu), ViT and SigLIP (no class token,
gelu_tanh, post_layernorm), following transformers' CLIPVisionModel / SiglipVisionModel / ViTModel math.

Parameters: patch_embed/kernel [p, p, C, D] (HF conv weight [D, C, p, p] transposed (2, 3, 1, 0)), patch_embed/bias
(ViT/SigLIP only), class_embedding [D], position_embedding [T, D], pre_norm, layers/... (mllm_jax.encoder),
post_norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax import layers as L
from mllm_jax import partitioning as part
from mllm_jax.config import RunSettings, VisionConfig
from mllm_jax.encoder import EncoderLayers, apply_encoder_layers

KINDS = ("vit", "clip", "siglip")


def layers_to_run(n_layers: int, select_layer: int) -> int:
    """HF hidden_states[select_layer] is the output after this many layers (index 0 = the embeddings)."""
    if not -(n_layers + 1) <= select_layer <= n_layers:
        raise ValueError(f"select_layer must be in [{-(n_layers + 1)}, {n_layers}] for {n_layers} layers; "
                         f"got {select_layer}")
    return select_layer if select_layer >= 0 else n_layers + 1 + select_layer


class VisionEncoder(nnx.Module):
    """pixels [N, H, W, C] -> features [N, num_features, d_model] (the hidden state of ``select_layer``)."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, lora_rank: int | None = None,
                 lora_targets: tuple = (), run: RunSettings = RunSettings()):
        cfg = config
        if cfg.kind not in KINDS:
            raise ValueError(f"VisionConfig.kind must be one of {KINDS}; got {cfg.kind!r}")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size ({cfg.image_size}) must be a multiple of patch_size ({cfg.patch_size})")
        self.config = cfg
        self.n_run = layers_to_run(cfg.n_layers, cfg.select_layer)
        L.check_layer_loop(run.layer_loop)
        self.run = run
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.d_model
        self.patch_embed = L.Linear((p, p, c), (d,), ("patch", "patch", "channels"), ("embed",), rngs=rngs,
                                    bias=cfg.kind != "clip")
        n_tokens = cfg.num_positions
        if cfg.class_token:
            self.class_embedding = part.param(jax.random.normal(rngs.params(), (d,)) * 0.02, ("embed",))
        self.position_embedding = part.param(jax.random.normal(rngs.params(), (n_tokens, d)) * cfg.position_init_std,
                                             ("positions", "embed"))
        if cfg.pre_norm:
            self.pre_norm = L.Norm(d, bias=True)
        self.layers = EncoderLayers(d, cfg.n_heads, cfg.d_ff, cfg.n_layers, rngs=rngs, lora_rank=lora_rank,
                                    lora_targets=lora_targets)
        if cfg.post_norm:
            self.post_norm = L.Norm(d, bias=True)

    def check_inputs(self, pixels):
        cfg = self.config
        shape = tuple(pixels.shape)
        if len(shape) != 4 or shape[3] != cfg.num_channels:
            raise ValueError(f"pixels must be NHWC [N, H, W, {cfg.num_channels}]; got shape {shape}")
        if shape[1] % cfg.patch_size or shape[2] % cfg.patch_size:
            raise ValueError(f"pixels {shape[1]}x{shape[2]} do not fit the patch grid of patch_size "
                             f"{cfg.patch_size}")
        if shape[1] != cfg.image_size or shape[2] != cfg.image_size:
            raise ValueError(f"pixels {shape[1]}x{shape[2]} do not match image_size {cfg.image_size} (the position "
                             f"embeddings cover {cfg.image_size // cfg.patch_size}^2 patches)")

    def embed(self, pixels_NHWC):
        """Patch + class + position embeddings [N, T, D] (CLIP: then pre_layrnorm) = HF hidden_states[0]."""
        self.check_inputs(pixels_NHWC)
        cfg = self.config
        dtype = L.dtype_of(self.run.dtype)
        n, hgt, wid, c = pixels_NHWC.shape
        p = cfg.patch_size
        hp, wp = hgt // p, wid // p
        # Spread the images over the rule's batch axes first (pixels may arrive sharded over fewer axes, or
        # replicated): every later op keeps that batch layout, each device embedding only its own images.
        x = part.constrain(pixels_NHWC.astype(dtype), ("batch", None, None, None))
        x = part.reshape(x, (n, hp, p, wp, p, c), ("batch", None, None, None, None, None))
        pe, pe_names = L.module_params(self.patch_embed)
        pe = L.use_params(pe, pe_names, dtype)
        x = L.linear(pe, x, "nhiwjc,ijcd->nhwd", ("batch", None, None, "act_embed"))
        x = part.reshape(x, (n, hp * wp, cfg.d_model), ("batch", "length", "act_embed"))
        table = self._position_table(dtype)
        if cfg.class_token:  # a zero row in front of the patches: the table's row 0 holds class + position 0
            x = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))
        x = x + table[None]
        if cfg.pre_norm:
            x = L.layer_norm(L.params_for_compute(self.pre_norm), x, cfg.norm_eps)
        return part.constrain(x, ("batch", "length", "act_embed"))

    def _position_table(self, dtype):
        """[T, D] added to the embedded tokens: the position embeddings, with the class embedding added to row 0
        (the class token's own position) when the tower has one."""
        values = {"pos": self.position_embedding[...]}
        names = {"pos": ("positions", "embed")}
        if self.config.class_token:
            values["cls"], names["cls"] = self.class_embedding[...], ("embed",)
        p = L.use_params(values, names, dtype)
        return p["pos"].at[0].add(p["cls"]) if "cls" in p else p["pos"]

    def __call__(self, pixels_NHWC):
        cfg = self.config
        x = self.embed(pixels_NHWC)
        x = apply_encoder_layers(self.layers, x, self.n_run, act=cfg.activation, eps=cfg.norm_eps, run=self.run)
        if cfg.post_norm and self.n_run == cfg.n_layers:
            x = L.layer_norm(L.params_for_compute(self.post_norm), x, cfg.norm_eps)
        if cfg.class_token and cfg.drop_class_token:
            x = x[:, 1:]
        return x
