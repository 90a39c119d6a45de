"""Per-architecture name maps between our parameter trees and Hugging Face tensor names, with the layout transform of
each tensor (both directions).

A ``Rule`` names one parameter of ours (its path in the nnx state, '/'-joined) and the HF tensor(s) it comes from:
``hf`` is a full tensor name, with ``{i}`` standing for the layer index when our parameter is stacked on a leading
``layers`` axis. Layout kinds, per layer:

- ``same``:   identical shape (embeddings, norms, position tables);
- ``flat``:   HF holds the tensor flattened (a q bias [H*Dh] is ours [H, Dh]);
- ``linear``: torch Linear weight [out, in] <-> our kernel [*in, *out] (``n_in`` leading dims are the input), e.g.
              q_proj [H*Dh, D] <-> [D, H, Dh] and o_proj [D, H*Dh] <-> [H, Dh, D];
- ``conv2d``: torch Conv2d weight [out, C, kh, kw] <-> our patch kernel [kh, kw, C, out];
- ``conv1d``: torch Conv1d weight [out, in, k] <-> our kernel [k, in, out];
- ``conv3d``: torch Conv3d weight [out, C, kt, kh, kw] <-> our kernel [C, kt, kh, kw, out] (Qwen2-VL's patch
              embedding, stride = kernel: a linear map of each flattened patch).

HF checkpoints differ in prefixes (``model.``, ``language_model.model.``, ``vision_tower.vision_model.``, ...), so the
rule sets are functions of the prefix, and ``find_prefix`` locates it from an anchor tensor.

MoE: a rule with ``experts`` > 0 reads one HF tensor per expert (``{e}`` in the name, e.g. Mixtral's
``block_sparse_moe.experts.{e}.w1.weight``: the layout transformers 5 writes and the hub checkpoints have) into our
[E, ...] expert stack; ``layers`` maps a stack that holds only some layers (the dense MLPs of a mixed MoE/dense
model) to their HF layer indices.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KINDS = ("same", "flat", "linear", "conv2d", "conv1d", "conv3d")


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    hf: str
    kind: str = "same"
    n_in: int = 1
    experts: int = 0  # > 0: one HF tensor per expert ({e} in ``hf``) for our [E, ...] per-layer parameter
    layers: tuple | None = None  # HF layer index of each entry of our stack (None: entry i is layer i)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def layer_names(self, i) -> list[str]:
        """The HF tensor names of entry ``i`` of our stack (None: an unstacked parameter)."""
        kw = {} if i is None else {"i": i if self.layers is None else self.layers[i]}
        if self.experts:
            return [self.hf.format(e=e, **kw) for e in range(self.experts)]
        return [self.hf.format(**kw) if kw else self.hf]

    def hf_names(self, n_layers: int | None) -> list[str]:
        if not self.stacked:
            return self.layer_names(None)
        n = len(self.layers) if self.layers is not None else n_layers
        return [name for i in range(n) for name in self.layer_names(i)]

    def read_layer(self, get, i, ours_shape: tuple) -> np.ndarray:
        """Entry ``i`` of our stack (or the unstacked parameter, i=None) from ``get(hf name) -> array``."""
        names = self.layer_names(i)
        if self.experts:
            return np.stack([self.to_ours(np.asarray(get(n)), tuple(ours_shape)[1:]) for n in names])
        return self.to_ours(get(names[0]), ours_shape)

    def layer_tensors(self, value: np.ndarray, i) -> dict:
        """{HF name: tensor} of entry ``i`` of our stack (value: that entry; i=None: unstacked)."""
        names = self.layer_names(i)
        if self.experts:
            return {n: self.to_hf(value[e]) for e, n in enumerate(names)}
        return {names[0]: self.to_hf(value)}

    def hf_shape(self, ours_shape: tuple) -> tuple:
        """The HF tensor shape of one (per-layer, per-expert) parameter of ours with this shape."""
        s = tuple(ours_shape)[1:] if self.experts else tuple(ours_shape)
        if self.kind == "same":
            return s
        if self.kind == "flat":
            return (math.prod(s),)
        if self.kind == "linear":
            return (math.prod(s[self.n_in :]), math.prod(s[: self.n_in]))
        if self.kind == "conv2d":
            kh, kw, c, o = s
            return (o, c, kh, kw)
        if self.kind == "conv1d":
            k, i, o = s
            return (o, i, k)
        if self.kind == "conv3d":
            return (s[-1],) + s[:-1]
        raise ValueError(f"rule for {self.ours}: unknown kind {self.kind!r}; known: {KINDS}")

    def to_ours(self, hf: np.ndarray, ours_shape: tuple) -> np.ndarray:
        s = tuple(ours_shape)
        if self.kind in ("same", "flat"):
            return hf.reshape(s)
        if self.kind == "linear":
            n_in = math.prod(s[: self.n_in])
            return hf.reshape(-1, n_in).T.reshape(s)
        if self.kind == "conv2d":
            return hf.transpose(2, 3, 1, 0)
        if self.kind == "conv1d":
            return hf.transpose(2, 1, 0)
        if self.kind == "conv3d":
            return hf.transpose(1, 2, 3, 4, 0)
        raise ValueError(f"rule for {self.ours}: unknown kind {self.kind!r}; known: {KINDS}")

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        s = ours.shape
        if self.kind in ("same", "flat"):
            return ours.reshape(self.hf_shape(s))
        if self.kind == "linear":
            return ours.reshape(math.prod(s[: self.n_in]), -1).T
        if self.kind == "conv2d":
            return ours.transpose(3, 2, 0, 1)
        if self.kind == "conv1d":
            return ours.transpose(2, 1, 0)
        if self.kind == "conv3d":
            return ours.transpose(4, 0, 1, 2, 3)
        raise ValueError(f"rule for {self.ours}: unknown kind {self.kind!r}; known: {KINDS}")


def find_prefix(keys, anchor: str, what: str, *, exclude: tuple = ()) -> str:
    """The prefix p such that p + anchor is a tensor name (the shortest, if several), else a ValueError."""
    hits = sorted((k[: -len(anchor)] for k in keys if k.endswith(anchor)
                   and not any(x in k[: -len(anchor)] for x in exclude)), key=len)
    hits = [h for h in hits if h == "" or h.endswith(".")]
    if not hits:
        raise ValueError(f"no {what} tensor '*{anchor}' in the checkpoint (is it the right architecture?)")
    return hits[0]


# ---------------------------------------------------------------------------------------------------------- LLM


def moe_rules(cfg, layer: str) -> list[Rule]:
    """The MoE MLPs (``layers/moe/...``, stacked over the MoE layers) <-> Mixtral's ``block_sparse_moe`` (w1 gate,
    w3 up, w2 down per expert) or Qwen2/3-MoE's ``mlp`` (gate router, experts.{e}.gate/up/down_proj, Qwen2-MoE's
    shared_expert and shared_expert_gate)."""
    from mllm_jax.hf.config_map import llm_model_type

    index = cfg.moe_layers
    mixtral = llm_model_type(cfg) == "mixtral"
    block = layer + ("block_sparse_moe." if mixtral else "mlp.")
    names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else {p: p + "_proj" for p in ("gate", "up", "down")}
    rules = [Rule("layers/moe/router/kernel", block + "gate.weight", "linear", layers=index)]
    rules += [Rule(f"layers/moe/experts/{p}/kernel", block + "experts.{e}." + names[p] + ".weight", "linear",
                   experts=cfg.n_experts, layers=index) for p in ("gate", "up", "down")]
    if cfg.shared_expert_d_ff:
        rules += [Rule(f"layers/moe/shared/{p}/kernel", block + f"shared_expert.{p}_proj.weight", "linear",
                       layers=index) for p in ("gate", "up", "down")]
        if cfg.shared_expert_gate:
            rules.append(Rule("layers/moe/shared_gate/kernel", block + "shared_expert_gate.weight", "linear",
                              layers=index))
    return rules


def llm_rules(cfg, prefix: str = "model.", head: str = "lm_head.weight") -> list[Rule]:
    """mllm_jax.LLM <-> Llama/Qwen2/Mistral/Gemma/Gemma2, Mixtral/Qwen2-MoE/Qwen3-MoE (``prefix`` +
    embed_tokens/layers/norm, ``head``)."""
    layer = prefix + "layers.{i}."
    dense = tuple(i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i))
    dense_index = None if len(dense) == cfg.n_layers else dense
    rules = [
        Rule("embed/embedding", prefix + "embed_tokens.weight"),
        Rule("final_norm/scale", prefix + "norm.weight"),
        Rule("layers/attn_norm/scale", layer + "input_layernorm.weight"),
        Rule("layers/attn/q/kernel", layer + "self_attn.q_proj.weight", "linear"),
        Rule("layers/attn/k/kernel", layer + "self_attn.k_proj.weight", "linear"),
        Rule("layers/attn/v/kernel", layer + "self_attn.v_proj.weight", "linear"),
        Rule("layers/attn/o/kernel", layer + "self_attn.o_proj.weight", "linear", n_in=2),
    ]
    if dense:
        rules += [Rule(f"layers/mlp/{p}/kernel", layer + f"mlp.{p}_proj.weight", "linear", layers=dense_index)
                  for p in ("gate", "up", "down")]
    if cfg.n_experts and cfg.moe_layers:
        rules += moe_rules(cfg, layer)
    if cfg.qk_norm:
        rules += [Rule(f"layers/attn/{p}_norm/scale", layer + f"self_attn.{p}_norm.weight") for p in "qk"]
    if cfg.post_norms:  # Gemma 2: four norms per layer
        rules += [
            Rule("layers/post_attn_norm/scale", layer + "post_attention_layernorm.weight"),
            Rule("layers/mlp_norm/scale", layer + "pre_feedforward_layernorm.weight"),
            Rule("layers/post_mlp_norm/scale", layer + "post_feedforward_layernorm.weight"),
        ]
    else:
        rules.append(Rule("layers/mlp_norm/scale", layer + "post_attention_layernorm.weight"))
    if cfg.qkv_bias:
        rules += [Rule(f"layers/attn/{p}/bias", layer + f"self_attn.{p}_proj.bias", "flat") for p in "qkv"]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head/kernel", head, "linear"))
    return rules


def llm_prefixes(keys) -> tuple[str, str]:
    """(prefix of embed_tokens/layers/norm, full name of lm_head) in a checkpoint of any LLM or LLaVA layout."""
    prefix = find_prefix(keys, "embed_tokens.weight", "LLM embedding", exclude=("decoder.",))
    heads = [k for k in keys if k.endswith("lm_head.weight")]
    return prefix, (min(heads, key=len) if heads else "lm_head.weight")


# ------------------------------------------------------------------------------------------------------- encoders


def _encoder_layer_rules(layer: str, *, ln1: str, ln2: str, fc: str, k_bias: bool) -> list[Rule]:
    """mllm_jax.encoder.EncoderLayers <-> one HF pre-LN block (CLIP/SigLIP ``layer_norm1/2`` + ``mlp.fc1``;
    Whisper ``self_attn_layer_norm``/``final_layer_norm`` + ``fc1``)."""
    rules = []
    for ours, hf in ((ln1, "ln1"), (ln2, "ln2")):
        rules += [Rule(f"layers/{hf}/scale", layer + ours + ".weight"), Rule(f"layers/{hf}/bias", layer + ours + ".bias")]
    for p, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        rules.append(Rule(f"layers/attn/{p}/kernel", layer + f"self_attn.{hf}.weight", "linear", 2 if p == "o" else 1))
        if p != "k" or k_bias:
            rules.append(Rule(f"layers/attn/{p}/bias", layer + f"self_attn.{hf}.bias", "flat"))
    for p in ("fc1", "fc2"):
        rules += [Rule(f"layers/mlp/{p}/kernel", layer + fc + p + ".weight", "linear"),
                  Rule(f"layers/mlp/{p}/bias", layer + fc + p + ".bias")]
    return rules


def vision_rules(cfg, prefix: str = "vision_model.") -> list[Rule]:
    """mllm_jax.VisionEncoder <-> CLIPVisionModel / SiglipVisionModel (``prefix`` + embeddings/encoder/...)."""
    emb = prefix + "embeddings."
    rules = [
        Rule("patch_embed/kernel", emb + "patch_embedding.weight", "conv2d"),
        Rule("position_embedding", emb + "position_embedding.weight"),
    ]
    if cfg.kind != "clip":
        rules.append(Rule("patch_embed/bias", emb + "patch_embedding.bias"))
    if cfg.class_token:
        rules.append(Rule("class_embedding", emb + "class_embedding"))
    if cfg.pre_norm:
        rules += [Rule("pre_norm/scale", prefix + "pre_layrnorm.weight"), Rule("pre_norm/bias", prefix + "pre_layrnorm.bias")]
    if cfg.post_norm:
        rules += [Rule("post_norm/scale", prefix + "post_layernorm.weight"),
                  Rule("post_norm/bias", prefix + "post_layernorm.bias")]
    return rules + _encoder_layer_rules(prefix + "encoder.layers.{i}.", ln1="layer_norm1", ln2="layer_norm2",
                                        fc="mlp.", k_bias=True)


def vision_prefix(keys) -> str:
    return find_prefix(keys, "embeddings.patch_embedding.weight", "vision tower patch embedding")


def whisper_rules(cfg, prefix: str = "encoder.") -> list[Rule]:
    """mllm_jax.AudioEncoder <-> WhisperEncoder (``prefix`` = "encoder." or "model.encoder."). The sinusoidal
    position table is computed, not loaded (Whisper's is fixed)."""
    rules = [
        Rule("conv1/kernel", prefix + "conv1.weight", "conv1d"),
        Rule("conv1/bias", prefix + "conv1.bias"),
        Rule("conv2/kernel", prefix + "conv2.weight", "conv1d"),
        Rule("conv2/bias", prefix + "conv2.bias"),
        Rule("final_norm/scale", prefix + "layer_norm.weight"),
        Rule("final_norm/bias", prefix + "layer_norm.bias"),
    ]
    return rules + _encoder_layer_rules(prefix + "layers.{i}.", ln1="self_attn_layer_norm", ln2="final_layer_norm",
                                        fc="", k_bias=False)


def whisper_prefix(keys) -> str:
    return find_prefix(keys, "conv1.weight", "Whisper encoder conv1")


def mlp_projector_rules(prefix: str = "multi_modal_projector.") -> list[Rule]:
    """The mlp Projector <-> LLaVA's multi_modal_projector (linear_1, act, linear_2)."""
    return [Rule(f"mlp/{ours}/{p}", prefix + f"{hf}.{'weight' if p == 'kernel' else 'bias'}",
                 "linear" if p == "kernel" else "same")
            for ours, hf in (("fc1", "linear_1"), ("fc2", "linear_2")) for p in ("kernel", "bias")]


def projector_prefix(keys) -> str:
    return find_prefix(keys, "multi_modal_projector.linear_1.weight", "LLaVA projector") + "multi_modal_projector."


def gemma3_projector_rules(prefix: str = "multi_modal_projector.") -> list[Rule]:
    """The gemma3 Projector <-> Gemma 3's multi_modal_projector: mm_soft_emb_norm and mm_input_projection_weight, a
    bare [vision d_model, text d_model] parameter (already our [in, out] layout, not a torch Linear)."""
    return [Rule("norm/scale", prefix + "mm_soft_emb_norm.weight"),
            Rule("proj/kernel", prefix + "mm_input_projection_weight")]


def gemma3_projector_prefix(keys) -> str:
    return find_prefix(keys, "multi_modal_projector.mm_input_projection_weight",
                       "Gemma 3 projector") + "multi_modal_projector."


def native_vision_rules(cfg, prefix: str = "visual.") -> list[Rule]:
    """mllm_jax.NativeVisionEncoder <-> the Qwen2-VL / Qwen2.5-VL vision tower (``prefix`` + patch_embed/blocks;
    checkpoints hold it under "visual." (the hub's names, which transformers also saves) or "model.visual."
    (transformers 5's module names))."""
    block = prefix + "blocks.{i}."
    norm = ("weight",) if cfg.kind == "qwen2_5_vl" else ("weight", "bias")
    rules = [Rule("patch_embed/kernel", prefix + "patch_embed.proj.weight", "conv3d")]
    rules += [Rule(f"layers/{n}/{'scale' if w == 'weight' else 'bias'}", block + f"{n}.{w}")
              for n in ("norm1", "norm2") for w in norm]
    rules += [Rule("layers/attn/qkv/kernel", block + "attn.qkv.weight", "linear"),
              Rule("layers/attn/qkv/bias", block + "attn.qkv.bias", "flat"),
              Rule("layers/attn/o/kernel", block + "attn.proj.weight", "linear", n_in=2),
              Rule("layers/attn/o/bias", block + "attn.proj.bias")]
    mlp = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"} if cfg.kind == "qwen2_5_vl" else {
        "fc1": "fc1", "fc2": "fc2"}
    for ours, hf in mlp.items():
        rules += [Rule(f"layers/mlp/{ours}/kernel", block + f"mlp.{hf}.weight", "linear"),
                  Rule(f"layers/mlp/{ours}/bias", block + f"mlp.{hf}.bias")]
    return rules


def native_vision_prefix(keys) -> str:
    return find_prefix(keys, "patch_embed.proj.weight", "Qwen2-VL vision patch embedding")


def patch_merger_rules(cfg, prefix: str = "visual.") -> list[Rule]:
    """The patch_merger Projector <-> Qwen2-VL's ``merger`` (ln_q, mlp.0, GELU, mlp.2), under the tower's prefix."""
    norm = ("weight",) if cfg.norm == "rms" else ("weight", "bias")
    rules = [Rule(f"norm/{'scale' if w == 'weight' else 'bias'}", prefix + f"merger.ln_q.{w}") for w in norm]
    return rules + [Rule(f"mlp/{ours}/{p}", prefix + f"merger.mlp.{hf}.{'weight' if p == 'kernel' else 'bias'}",
                         "linear" if p == "kernel" else "same")
                    for ours, hf in (("fc1", 0), ("fc2", 2)) for p in ("kernel", "bias")]


def under(scope: str, rules: list[Rule]) -> list[Rule]:
    """The same rules for a submodule at ``scope`` of a larger module (e.g. "encoders/vision")."""
    return [dataclasses.replace(r, ours=f"{scope}/{r.ours}") for r in rules]
