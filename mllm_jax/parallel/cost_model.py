"""Frozen-aware cost model of one training iteration over plain layer descriptions (``Layer``): the backward by
frozen status and position, rematerialisation, and the memory a pipeline stage holds. It knows no model class: the
model describes its layers (mllm_jax.costs turns its configs into Layers) with the FLOP counts defined here.

Backward rule (DESIGN.md, "Frozen-aware cost model and pipeline"), per layer on its data path:
  dX (input gradient) is computed only if something upstream of the layer is trainable;
  dW (weight gradient) only if the layer's own weights train (LoRA: only the adapters' dW);
  so a frozen layer with nothing trainable upstream costs 0, a frozen layer after a trainable one costs dX (= f for
  pure GEMM layers), a trainable layer after a trainable one dX + dW (= 2f). Weight-free products (attention scores
  and values) have no dW and a dX of twice their forward. With rematerialisation the forward runs again wherever
  b > 0.

All costs are per microbatch and per model replica (divide by the tensor-parallel degree for per-device numbers);
units are FLOPs unless a measured profile replaces them (``apply_profile``: seconds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Bytes of optimizer state + gradient per trainable parameter (float32 gradient, Adam's two moments).
GRAD_AND_ADAM_BYTES = 4 + 8


@dataclass(frozen=True)
class Layer:
    """One unit the planner places. ``weight_flops``: forward FLOPs of products with weights (these have a dW);
    ``free_flops``: forward FLOPs without weights (attention scores/values, norms); ``lora_flops``: forward FLOPs of
    LoRA adapters (trainable even when the base weights are frozen). ``act_bytes``: activations saved for the
    backward per microbatch without remat; ``io_bytes``: the layer's input (what remat saves)."""

    name: str
    module: str  # "llm", "encoders/<name>", "projectors/<name>"
    weight_flops: float
    free_flops: float = 0.0
    lora_flops: float = 0.0
    params: int = 0
    lora_params: int = 0
    trainable: bool = True  # the base weights train
    act_bytes: float = 0.0
    io_bytes: float = 0.0

    @property
    def fwd(self) -> float:
        return self.weight_flops + self.free_flops + self.lora_flops

    @property
    def has_trainable(self) -> bool:
        return self.trainable or self.lora_params > 0

    @property
    def trainable_params(self) -> int:
        return (self.params if self.trainable else 0) + self.lora_params


@dataclass(frozen=True)
class CostedLayer:
    """A Layer with its backward resolved by position: fwd, bwd (incl. the remat recompute), memory per microbatch."""

    layer: Layer
    fwd: float
    bwd: float
    needs_dx: bool
    act_bytes: float  # saved per microbatch in flight (0 when the layer has no backward)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def total(self) -> float:
        return self.fwd + self.bwd

    @property
    def param_bytes(self) -> float:
        return 4.0 * (self.layer.params + self.layer.lora_params)

    @property
    def state_bytes(self) -> float:
        """Gradients and optimizer state: only for trainable parameters."""
        return GRAD_AND_ADAM_BYTES * self.layer.trainable_params


def backward_flops(layer: Layer, needs_dx: bool) -> float:
    """dX if ``needs_dx`` plus dW of the trainable weights, without remat."""
    dx = (layer.weight_flops + 2.0 * layer.free_flops + layer.lora_flops) if needs_dx else 0.0
    dw = (layer.weight_flops if layer.trainable else 0.0) + layer.lora_flops
    return dx + dw


def cost_chain(layers, *, upstream_trainable: bool = False, remat: bool = False, frozen_aware: bool = True):
    """Resolve the backward of a chain of layers in data-flow order. ``upstream_trainable``: something before the
    chain trains (its input needs a gradient). ``frozen_aware=False`` costs every layer as if it trained (what a
    frozen-unaware planner such as Megatron-LM's assumes). Returns (list[CostedLayer], chain has a trainable)."""
    out = []
    upstream = upstream_trainable
    for layer in layers:
        if frozen_aware:
            bwd = backward_flops(layer, needs_dx=upstream)
        else:
            bwd = backward_flops(dataclasses.replace(layer, trainable=True), needs_dx=True)
        saved = 0.0
        if bwd > 0:
            saved = layer.io_bytes if remat else layer.act_bytes
            if remat:
                bwd += layer.fwd
        out.append(CostedLayer(layer, layer.fwd, bwd, upstream, saved))
        upstream = upstream or layer.has_trainable
    return out, upstream


def apply_profile(layers, profile: dict):
    """Replace FLOPs by measured forward seconds {layer name: seconds}, keeping each layer's weight/free/lora split."""
    out = []
    for layer in layers:
        if layer.name not in profile:
            out.append(layer)
            continue
        t = float(profile[layer.name])
        if t < 0:
            raise ValueError(f"profile[{layer.name!r}] must be >= 0 seconds; got {t}")
        scale = t / layer.fwd if layer.fwd > 0 else 0.0
        out.append(
            dataclasses.replace(
                layer,
                weight_flops=layer.weight_flops * scale,
                free_flops=layer.free_flops * scale,
                lora_flops=layer.lora_flops * scale,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# FLOPs of a transformer's pieces from plain sizes (2 FLOPs per multiply-add): the one formula for the pipeline
# planner's layers (through mllm_jax.costs) and the context planner's per-block costs (CostModel).


def causal_pairs(seq_len: int, window: int | None = None) -> int:
    """Number of (q, k) pairs a causal (optionally sliding-window) mask keeps for one sequence."""
    s = seq_len
    if window is None or window >= s:
        return s * (s + 1) // 2
    return window * (window + 1) // 2 + (s - window) * window


def attention_flops_per_pair(n_heads: int, head_dim: int) -> int:
    """Forward FLOPs of one attending (query, key) pair: QK^T and PV, 2 matmuls x 2 FLOPs per multiply-add per head."""
    return 4 * n_heads * head_dim


def decoder_linear_flops_per_token(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, *,
                                   mlp_matrices: int = 3, experts_per_token: int = 1, n_experts: int = 1) -> int:
    """Forward FLOPs per token of a decoder layer's products with weights: q, k, v, o projections, the MLP's
    ``mlp_matrices`` matrices (3 gated, 2 plain) per routed expert, and the router when there are several experts."""
    q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
    attn = 2 * d_model * q_width + 2 * 2 * d_model * kv_width + 2 * q_width * d_model
    mlp = mlp_matrices * 2 * d_model * d_ff * experts_per_token + (2 * d_model * n_experts if n_experts > 1 else 0)
    return attn + mlp


@dataclass(frozen=True)
class CostModel:
    """Per-layer forward FLOPs of one non-empty attention tile (alpha) and of one token through the linear layers
    (beta): the context planner's block cost. Defaults: a Llama-3-8B decoder layer. Backward passes scale both by
    about the same factor."""

    d_model: int = 4096
    d_ff: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    gated_mlp: bool = True
    tile_q: int = 128
    tile_k: int = 32

    @property
    def alpha(self) -> float:
        return float(self.tile_q * self.tile_k * attention_flops_per_pair(self.n_heads, self.head_dim))

    @property
    def beta(self) -> float:
        return float(decoder_linear_flops_per_token(self.d_model, self.n_heads, self.n_kv_heads, self.head_dim,
                                                    self.d_ff, mlp_matrices=3 if self.gated_mlp else 2))


@dataclass(frozen=True)
class ModelCosts:
    """Resolved costs of one microbatch: per encoder the chain stem..layers..projector, the LLM's embedding, layers
    and head. ``llm_upstream_trainable``: something before the LLM's first layer trains (its input needs dX)."""

    encoders: dict  # name -> list[CostedLayer] (the projector last)
    embed: CostedLayer
    llm: list  # list[CostedLayer]
    head: CostedLayer
    llm_upstream_trainable: bool

    def encoder_total(self, name=None) -> float:
        names = [name] if name is not None else list(self.encoders)
        return sum(c.total for n in names for c in self.encoders[n])


@dataclass(frozen=True)
class PipelineCosts:
    """What the pipeline planner compares placements on (per microbatch): ``aware``, the frozen-aware costs with the
    run's remat; ``unaware``, every layer costed as if it trained (what a frozen-unaware planner such as
    Megatron-LM's balances: the Megatron-like baseline); ``runtime``, the frozen-aware costs with remat, which is
    how parallel.pipeline runs every layer."""

    aware: ModelCosts
    unaware: ModelCosts
    runtime: ModelCosts


def stage_memory(layers, *, in_flight: int, tensor: int = 1) -> dict:
    """Bytes one device of a stage holds: parameters, gradients + optimizer state of trainable ones, and the saved
    activations of ``in_flight`` microbatches (1F1B: stages - stage index). Tensor parallelism splits all three."""
    params = sum(c.param_bytes for c in layers) / tensor
    state = sum(c.state_bytes for c in layers) / tensor
    acts = in_flight * sum(c.act_bytes for c in layers) / tensor
    return {"params": params, "optimizer": state, "activations": acts, "total": params + state + acts}
