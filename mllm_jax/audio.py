"""The Whisper encoder (transformers' WhisperEncoder math) from log-mel frames [N, T, n_mels], T = 2 * positions.

conv1 (k=3, pad 1) + GELU, conv2 (k=3, stride 2, pad 1) + GELU, + sinusoidal positions, pre-LN layers (k_proj has no
bias), final LayerNorm. Parameters: conv1/kernel [3, n_mels, D] and conv2/kernel [3, D, D] (HF Conv1d weight
[out, in, k] transposed (2, 1, 0)), conv biases, layers/... (mllm_jax.encoder), final_norm.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax import layers as L
from mllm_jax import partitioning as part
from mllm_jax.config import AudioConfig, RunSettings
from mllm_jax.encoder import EncoderLayers, apply_encoder_layers


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal position table [length, channels]: sin of the first half, cos of the second."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even number of channels; got {channels}")
    log_inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-log_inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def conv1d(p: dict, x_NTC, stride: int):
    """Conv1d with kernel 3 and padding 1 as a sum of 3 shifted matmuls (layout-friendly on sharded meshes)."""
    k = p["kernel"].shape[0]
    n, t, _ = x_NTC.shape
    t_out = (t + 2 - k) // stride + 1
    xp = jnp.pad(x_NTC, ((0, 0), (1, 1), (0, 0)))
    y = 0
    for i in range(k):
        xi = xp[:, i:i + stride * (t_out - 1) + 1:stride]
        y = y + L.linear({"kernel": p["kernel"][i]}, xi, "ntc,cd->ntd", ("batch", "length", "act_embed"))
    # The bias keeps its storage layout minus the batch axes: where the rule's batch leaves "fsdp" out, it is still
    # fsdp-sharded over the features, and so would the sum be; lay the output out as the activations' rule says.
    return part.constrain(y + p["bias"], ("batch", "length", "act_embed"))


class AudioEncoder(nnx.Module):
    def __init__(self, config: AudioConfig, *, rngs: nnx.Rngs, lora_rank: int | None = None,
                 lora_targets: tuple = (), run: RunSettings = RunSettings()):
        cfg = config
        if cfg.kind != "whisper":
            raise ValueError(f"AudioConfig.kind must be 'whisper'; got {cfg.kind!r}")
        self.config = cfg
        L.check_layer_loop(run.layer_loop)
        self.run = run
        d = cfg.d_model
        self.conv1 = L.Linear((3, cfg.n_mels), (d,), ("conv_width", "mel"), ("embed",), rngs=rngs)
        self.conv2 = L.Linear((3, d), (d,), ("conv_width", "conv_in"), ("embed",), rngs=rngs)
        self.layers = EncoderLayers(d, cfg.n_heads, cfg.d_ff, cfg.n_layers, rngs=rngs, k_bias=False,
                                    lora_rank=lora_rank, lora_targets=lora_targets)
        self.final_norm = L.Norm(d, bias=True)

    def check_inputs(self, mel):
        cfg = self.config
        shape = tuple(mel.shape)
        if len(shape) != 3 or shape[2] != cfg.n_mels:
            raise ValueError(f"log-mel input must be [N, T, n_mels={cfg.n_mels}]; got shape {shape}")
        if shape[1] != cfg.num_frames:
            raise ValueError(f"log-mel input must have T = 2 * max_source_positions = {cfg.num_frames} frames; "
                             f"got {shape[1]}")

    def __call__(self, mel_NTM):
        self.check_inputs(mel_NTM)
        cfg = self.config
        dtype = L.dtype_of(self.run.dtype)
        x = part.constrain(mel_NTM.astype(dtype), ("batch", "length", None))
        c1, n1 = L.module_params(self.conv1)
        c2, n2 = L.module_params(self.conv2)
        gelu = L.activation("gelu")
        x = gelu(conv1d(L.use_params(c1, n1, dtype), x, 1))
        x = gelu(conv1d(L.use_params(c2, n2, dtype), x, 2))
        x = x + jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model), dtype)[None]
        x = apply_encoder_layers(self.layers, x, cfg.n_layers, act=cfg.activation, eps=cfg.norm_eps, run=self.run)
        return L.layer_norm(L.params_for_compute(self.final_norm), x, cfg.norm_eps)
