"""Hugging Face ``config.json`` <-> mllm_jax configs (mllm_jax.config).

One function per direction and family. The HF side is a plain dict (what ``config.json`` holds), so this module needs
neither torch nor transformers. Both the transformers-4 spelling (``rope_theta``/``rope_scaling`` at the top level) and
the transformers-5 one (``rope_parameters``) are read; options our model cannot reproduce are refused with a
ValueError naming the option and its value rather than silently ignored.
"""

from __future__ import annotations

import dataclasses

from mllm_jax.config import (AudioConfig, LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig, RopeScaling,
                             VisionConfig)

LLM_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "mixtral", "qwen2_moe",
             "qwen3_moe", "qwen2_vl_text", "qwen2_5_vl_text")
# The text models of Qwen2-VL / Qwen2.5-VL: Qwen2 layers with M-RoPE (the text_config of a qwen2_vl / qwen2_5_vl).
MROPE_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")
DEFAULT_MROPE_SECTION = (16, 24, 24)  # what transformers' Qwen2-VL rotary uses when the config names none
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "clip", "siglip")
AUDIO_TYPES = ("whisper",)
MULTIMODAL_TYPES = ("llava", "gemma3", "qwen2_vl", "qwen2_5_vl")
SUPPORTED_TYPES = LLM_TYPES + VISION_TYPES + AUDIO_TYPES + MULTIMODAL_TYPES

# Modality names used for LLaVA-style models (the keys of ModelConfig.encoders / projectors / placeholder_ids).
VISION_NAME = "vision"
AUDIO_NAME = "audio"

# HF activation name -> ours. gelu_pytorch_tanh / gelu_new / gelu_fast are all the tanh approximation.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
_ACTIVATIONS_BACK = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


def unsupported_type(model_type) -> ValueError:
    return ValueError(
        f"unsupported Hugging Face architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}"
    )


def _activation(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{where}: unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope(hf: dict) -> dict:
    """LLMConfig's RoPE fields (rope_theta, rope_scaling, rope_linear_factor, mrope_section, rope_local_theta) from
    either spelling of the RoPE options: transformers 4 (rope_theta / rope_scaling at the top level) or 5
    (rope_parameters; Gemma 3 keys it by layer type)."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5 Gemma 3: one rope per layer type
        out = _rope_params(dict(params.get("full_attention") or {}), hf)
        local = _rope_params(dict(params.get("sliding_attention") or {}), {"rope_theta": 10000.0})
        if local["rope_scaling"] is not None or local["rope_linear_factor"] != 1.0 or local["mrope_section"]:
            raise ValueError(f"the sliding-window layers' rope must be unscaled (rope_type 'default'); got "
                             f"{params.get('sliding_attention')}")
        return {**out, "rope_local_theta": local["rope_theta"]}
    scaling = hf.get("rope_scaling") or None
    if scaling:
        params = {**params, **scaling}
    out = _rope_params(params, hf)
    if hf.get("rope_local_base_freq") is not None:  # transformers 4 Gemma 3
        out["rope_local_theta"] = float(hf["rope_local_base_freq"])
    return out


def _rope_params(params: dict, hf: dict) -> dict:
    """The RoPE fields of one rope dict (rope_type default / llama3 / linear; Qwen2-VL's "mrope" is default rope
    with an mrope_section)."""
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    section = params.get("mrope_section")
    out = dict(rope_theta=theta, rope_scaling=None, rope_linear_factor=1.0,
               mrope_section=tuple(int(x) for x in section) if section else None)
    if rope_type in ("default", "mrope"):
        return out
    if rope_type == "linear":
        return {**out, "rope_linear_factor": float(params["factor"])}
    if rope_type == "llama3":
        return {**out, "rope_scaling": RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )}
    raise ValueError(f"unsupported rope scaling rope_type={rope_type!r}; supported: 'default', 'llama3', 'linear' "
                     f"(and Qwen2-VL's 'mrope')")


def _window_pattern(hf: dict, model_type: str) -> int | None:
    """LLMConfig.sliding_window_pattern from HF ``layer_types`` (None: no layer is local). Without layer_types:
    Mistral is local everywhere (0), Gemma 2 alternates local/global (2)."""
    types = hf.get("layer_types")
    if not types:
        if model_type == "gemma3_text":  # transformers 4 spelling: sliding_window_pattern (default 6)
            return int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        return 2 if model_type == "gemma2" else 0
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return 0
    for n in range(2, len(types) + 1):
        if all(t == ("full_attention" if (i + 1) % n == 0 else "sliding_attention") for i, t in enumerate(types)):
            return n
    raise ValueError(f"{model_type}: layer_types {types} is not a repeating pattern of local layers ending in a "
                     "global one (LLMConfig.sliding_window_pattern)")


def llm_from_hf(hf: dict) -> LLMConfig:
    """An LLM's config.json (or the text_config of a multimodal one: gemma3_text, qwen2_vl_text) -> LLMConfig."""
    model_type = hf.get("model_type")
    if model_type not in LLM_TYPES:
        raise unsupported_type(model_type)
    if hf.get("mlp_bias"):
        raise ValueError(f"{model_type}: mlp_bias=True is not supported by mllm_jax.LLM")
    if model_type not in ("qwen2", "qwen2_moe") and hf.get("attention_bias"):
        raise ValueError(f"{model_type}: attention_bias=True (bias on q/k/v/o) is not supported by mllm_jax.LLM")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{model_type}: use_bidirectional_attention=True (an encoder, not a causal LM) is not "
                         f"supported")
    n_heads = int(hf["num_attention_heads"])
    rope = _rope(hf)
    if model_type in MROPE_TYPES:
        rope["mrope_section"] = rope["mrope_section"] or DEFAULT_MROPE_SECTION
    elif rope["mrope_section"]:
        raise ValueError(f"{model_type}: mrope_section={rope['mrope_section']} (M-RoPE) belongs to {MROPE_TYPES}")
    if rope.get("rope_local_theta") is not None and model_type != "gemma3_text":
        raise ValueError(f"{model_type}: a separate rope for local layers (rope_local_base_freq) is Gemma 3's alone")
    gemma = model_type in GEMMA_TYPES
    act_name = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    activation = _activation(act_name, model_type)  # Gemma: hidden_activation (newer configs) wins over hidden_act
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", *MROPE_TYPES) and hf.get("use_sliding_window"):
        raise ValueError(f"{model_type}: use_sliding_window=True (window on the upper layers only) is not supported")
    sliding = hf.get("sliding_window") if model_type in ("mistral", "gemma2", "gemma3_text", "mixtral") else None
    pattern = _window_pattern(hf, model_type) if sliding is not None else 0
    if pattern is None:
        sliding, pattern = None, 0
    post_norm_type = model_type in ("gemma2", "gemma3_text")
    return LLMConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
        d_ff=int(hf["intermediate_size"]),
        activation=activation,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_scale_plus_one=gemma,
        embed_scale=gemma,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=model_type in ("qwen2", "qwen2_moe", *MROPE_TYPES),
        **rope,
        sliding_window=int(sliding) if sliding is not None else None,
        sliding_window_pattern=pattern,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if post_norm_type else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if post_norm_type else None,
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]) if post_norm_type else None,
        post_norms=post_norm_type,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        **(_moe_from_hf(hf, model_type) if model_type in MOE_TYPES else {}),
    )


def _moe_from_hf(hf: dict, model_type: str) -> dict:
    """LLMConfig MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json."""
    if float(hf.get("router_jitter_noise") or 0.0):
        raise ValueError(f"{model_type}: router_jitter_noise={hf['router_jitter_noise']} (noise on the router input "
                         f"in training) is not supported")
    if model_type == "mixtral":
        return dict(n_experts=int(hf["num_local_experts"]), experts_per_token=int(hf["num_experts_per_tok"]),
                    norm_topk_prob=True, router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense = sorted(int(i) for i in (hf.get("mlp_only_layers") or ()))
    if dense != list(range(len(dense))):
        raise ValueError(f"{model_type}: mlp_only_layers={dense} must be the first k layers "
                         f"(LLMConfig.moe_first_dense_layers)")
    shared = int(hf.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 spells it num_local_experts
    return dict(n_experts=int(experts), experts_per_token=int(hf["num_experts_per_tok"]),
                moe_d_ff=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "qwen3_moe")),
                shared_expert_d_ff=shared, shared_expert_gate=bool(shared),
                moe_layer_freq=step, moe_first_dense_layers=len(dense),
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))


def llm_model_type(cfg: LLMConfig) -> str:
    """The HF architecture an LLMConfig corresponds to (the inverse of llm_from_hf)."""
    if cfg.n_experts:
        if cfg.qk_norm:
            return "qwen3_moe"
        return "qwen2_moe" if cfg.qkv_bias or cfg.shared_expert_d_ff or cfg.moe_d_ff else "mixtral"
    if cfg.mrope_section is not None:
        return "qwen2_vl_text"  # the text_config of a qwen2_vl (qwen2_5_vl_text: pass model_type)
    if cfg.norm_scale_plus_one and (cfg.qk_norm or cfg.rope_local_theta is not None):
        return "gemma3_text"
    if cfg.post_norms or cfg.attn_logit_softcap is not None or cfg.final_logit_softcap is not None:
        return "gemma2"
    if cfg.norm_scale_plus_one:
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


_LLM_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def llm_to_hf(cfg: LLMConfig, model_type: str | None = None) -> dict:
    model_type = model_type or llm_model_type(cfg)
    if model_type not in LLM_TYPES:
        raise unsupported_type(model_type)
    _check_exportable(cfg, model_type)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
    if cfg.rope_linear_factor != 1.0:
        rope = {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": cfg.rope_linear_factor}
    if cfg.mrope_section is not None:
        rope = {**rope, "mrope_section": list(cfg.mrope_section)}
    hf = {
        "model_type": model_type,
        "architectures": [_LLM_ARCHS[model_type]] if model_type in _LLM_ARCHS else [],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.d_ff,
        "hidden_act": _ACTIVATIONS_BACK[cfg.activation],
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        # Both spellings, so transformers 4 and 5 read the same RoPE.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "attention_bias": False,
    }
    if model_type in GEMMA_TYPES:
        hf["hidden_activation"] = hf["hidden_act"]
    if model_type in ("mistral", "gemma2", "gemma3_text", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window
        if cfg.sliding_window is not None:
            n = cfg.sliding_window_pattern
            hf["layer_types"] = ["full_attention" if n and (i + 1) % n == 0 else "sliding_attention"
                                 for i in range(cfg.n_layers)]
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", *MROPE_TYPES):
        hf["use_sliding_window"] = False
        hf["sliding_window"] = None
    if model_type in MOE_TYPES:
        hf.update(_moe_to_hf(cfg, model_type))
    if model_type in ("gemma2", "gemma3_text"):
        hf.update(
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.resolved_head_dim),
            sliding_window=cfg.sliding_window,
        )
    if cfg.mrope_section is not None:  # transformers 4 reads Qwen2-VL's sections from rope_scaling {"type": "mrope"}
        hf["rope_scaling"] = {"type": "mrope", "mrope_section": list(cfg.mrope_section)}
    if model_type == "gemma3_text":  # one rope per layer type (transformers 5), and the transformers 4 spelling
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
        hf["rope_local_base_freq"] = local["rope_theta"]
        hf["rope_scaling"] = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items()
                                                                           if k != "rope_theta"}
        hf["use_bidirectional_attention"] = False
    return hf


def _check_exportable(cfg: LLMConfig, model_type: str) -> None:
    """Refuse an LLMConfig whose options ``model_type`` cannot express (rather than writing a different model)."""
    if cfg.mrope_section is not None and model_type not in MROPE_TYPES:
        raise ValueError(f"{model_type}: mrope_section={cfg.mrope_section} (M-RoPE) is only expressible as "
                         f"{MROPE_TYPES}")
    if cfg.rope_local_theta is not None and model_type != "gemma3_text":
        raise ValueError(f"{model_type}: rope_local_theta={cfg.rope_local_theta} is only expressible as gemma3_text")
    if cfg.qk_norm and model_type not in ("qwen3", "qwen3_moe", "gemma3_text"):
        raise ValueError(f"{model_type}: qk_norm=True is only expressible as qwen3, qwen3_moe or gemma3_text")


def _moe_to_hf(cfg: LLMConfig, model_type: str) -> dict:
    """The MoE entries of config.json; refuses what the architecture cannot express."""
    if cfg.router_activation != "softmax" or cfg.moe_capacity_factor is not None:
        raise ValueError(f"{model_type}: router_activation={cfg.router_activation!r} and moe_capacity_factor="
                         f"{cfg.moe_capacity_factor} have no Hugging Face equivalent (softmax, dropless)")
    common = {"num_experts_per_tok": cfg.experts_per_token, "router_aux_loss_coef": cfg.router_aux_loss_coef,
              "output_router_logits": False}
    if model_type == "mixtral":
        if cfg.moe_layers != tuple(range(cfg.n_layers)) or cfg.shared_expert_d_ff or not cfg.norm_topk_prob or (
                cfg.moe_d_ff not in (None, cfg.d_ff)):
            raise ValueError("mixtral: every layer MoE, no shared expert, renormalised top-k and expert d_ff = d_ff; "
                             f"got MoE layers {cfg.moe_layers}, shared_expert_d_ff={cfg.shared_expert_d_ff}, "
                             f"norm_topk_prob={cfg.norm_topk_prob}, moe_d_ff={cfg.moe_d_ff}")
        return {**common, "num_local_experts": cfg.n_experts, "router_jitter_noise": 0.0}
    if (cfg.shared_expert_d_ff > 0) != (model_type == "qwen2_moe") or (
            cfg.shared_expert_d_ff and not cfg.shared_expert_gate):
        raise ValueError(f"{model_type}: a gated shared expert is Qwen2-MoE's alone; got shared_expert_d_ff="
                         f"{cfg.shared_expert_d_ff}, shared_expert_gate={cfg.shared_expert_gate}")
    out = {**common, "num_experts": cfg.n_experts, "num_local_experts": cfg.n_experts, "moe_intermediate_size": cfg.resolved_moe_d_ff,
           "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": cfg.moe_layer_freq,
           "mlp_only_layers": list(range(cfg.moe_first_dense_layers))}
    if model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = cfg.shared_expert_d_ff
    return out


def _int_if_whole(x):
    """transformers' strict config fields want an int where the value is one (query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else float(x)


def vision_from_hf(hf: dict, *, select_layer: int = -1, drop_class_token: bool = False) -> VisionConfig:
    """CLIP or SigLIP vision tower. Defaults give the HF ``last_hidden_state`` (all tokens, after SigLIP's
    post_layernorm); LLaVA passes its own select_layer / drop_class_token."""
    model_type = hf.get("model_type")
    if model_type not in VISION_TYPES:
        raise unsupported_type(model_type)
    siglip = model_type.startswith("siglip")
    return VisionConfig(
        kind="siglip" if siglip else "clip",
        image_size=int(hf["image_size"]),
        patch_size=int(hf["patch_size"]),
        num_channels=int(hf.get("num_channels", 3)),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=int(hf["num_attention_heads"]),
        d_ff=int(hf["intermediate_size"]),
        activation=_activation(hf.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"), model_type),
        norm_eps=float(hf.get("layer_norm_eps", 1e-6 if siglip else 1e-5)),
        class_token=not siglip,
        pre_norm=not siglip,
        post_norm=siglip,
        select_layer=select_layer,
        drop_class_token=drop_class_token if not siglip else False,
    )


def vision_to_hf(cfg: VisionConfig) -> dict:
    if cfg.kind not in ("clip", "siglip"):
        raise ValueError(f"vision kind {cfg.kind!r} has no Hugging Face equivalent here; supported: 'clip', 'siglip'")
    siglip = cfg.kind == "siglip"
    hf = {
        "model_type": "siglip_vision_model" if siglip else "clip_vision_model",
        "architectures": ["SiglipVisionModel" if siglip else "CLIPVisionModel"],
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": _ACTIVATIONS_BACK[cfg.activation],
        "layer_norm_eps": cfg.norm_eps,
    }
    if siglip:
        hf["vision_use_head"] = False  # the attention-pooling head is not part of our tower
    return hf


NATIVE_VISION_TYPES = ("qwen2_vl", "qwen2_5_vl")  # the parent model types; their vision_config's are "<type>_vision"


def native_vision_from_hf(hf: dict, model_type: str | None = None) -> tuple[NativeVisionConfig, ProjectorConfig]:
    """A Qwen2-VL / Qwen2.5-VL ``vision_config`` -> (tower, its patch-merger projector). ``model_type``: the parent's
    ("qwen2_vl" / "qwen2_5_vl"), else the vision config's own ("qwen2_vl_vision", ...)."""
    kind = (model_type or hf.get("model_type") or "").removesuffix("_vision")
    if kind not in NATIVE_VISION_TYPES:
        raise ValueError(f"native vision config: model_type {model_type or hf.get('model_type')!r} is not one of "
                         f"{NATIVE_VISION_TYPES}")
    params = dict(hf.get("rope_parameters") or {})
    if params.get("rope_type", "axial") not in ("axial", "default"):
        raise ValueError(f"{kind} vision: unsupported rope_type={params['rope_type']!r}; supported: 'axial'")
    qwen25 = kind == "qwen2_5_vl"
    d = int(hf["hidden_size"] if qwen25 else hf["embed_dim"])
    n_heads = int(hf["num_heads"])
    if hf.get("head_dim") not in (None, d // n_heads):
        raise ValueError(f"{kind} vision: head_dim={hf['head_dim']} != hidden size / num_heads ({d // n_heads}) is "
                         f"not supported")
    merge = int(hf.get("spatial_merge_size", 2))
    tower = NativeVisionConfig(
        kind=kind,
        patch_size=int(hf.get("patch_size", 14)),
        temporal_patch_size=int(hf.get("temporal_patch_size", 2)),
        spatial_merge_size=merge,
        num_channels=int(hf.get("in_channels", 3)),
        d_model=d,
        n_layers=int(hf["depth"]),
        n_heads=n_heads,
        d_ff=int(hf["intermediate_size"]) if qwen25 else int(d * hf.get("mlp_ratio", 4)),
        activation=_activation(hf.get("hidden_act", "silu" if qwen25 else "quick_gelu"), f"{kind} vision"),
        norm_eps=1e-6,  # hard-coded in HF's vision blocks
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        window_size=int(hf.get("window_size", 112)) if qwen25 else 0,
        full_attention_layers=tuple(int(i) for i in hf.get("fullatt_block_indexes", ())) if qwen25 else (),
        tokens_per_second=float(hf.get("tokens_per_second", 0.0)) if qwen25 else 0.0,
    )
    return tower, ProjectorConfig(kind="patch_merger", merge_size=merge, norm="rms" if qwen25 else "layer",
                                  activation="gelu")


def native_vision_to_hf(cfg: NativeVisionConfig, projector: ProjectorConfig, out_dim: int) -> dict:
    """(tower, patch merger projecting to ``out_dim``, the LLM's d_model) -> the HF ``vision_config`` dict."""
    qwen25 = cfg.kind == "qwen2_5_vl"
    want = ProjectorConfig(kind="patch_merger", merge_size=cfg.spatial_merge_size, norm="rms" if qwen25 else "layer",
                           activation="gelu")
    if dataclasses.replace(projector, hidden_dim=None) != want or projector.hidden_dim not in (
            None, cfg.d_model * cfg.merge_units):
        raise ValueError(f"{cfg.kind} export needs the HF merger: {want} (hidden_dim None or "
                         f"{cfg.d_model * cfg.merge_units}); got {projector}")
    hf = {
        "model_type": f"{cfg.kind}_vision",
        "depth": cfg.n_layers,
        "num_heads": cfg.n_heads,
        "in_channels": cfg.num_channels,
        "patch_size": cfg.patch_size,
        "spatial_merge_size": cfg.spatial_merge_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "hidden_act": _ACTIVATIONS_BACK[cfg.activation],
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "axial"},
    }
    if qwen25:
        return hf | {"hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "out_hidden_size": out_dim,
                     "window_size": cfg.window_size, "fullatt_block_indexes": list(cfg.full_attention_layers),
                     "tokens_per_second": _int_if_whole(cfg.tokens_per_second)}
    if cfg.d_ff % cfg.d_model:
        raise ValueError(f"qwen2_vl export: d_ff ({cfg.d_ff}) must be a multiple of d_model ({cfg.d_model}) (HF "
                         f"mlp_ratio is an int)")
    return hf | {"embed_dim": cfg.d_model, "hidden_size": out_dim, "mlp_ratio": cfg.d_ff // cfg.d_model}


def audio_from_hf(hf: dict) -> AudioConfig:
    if hf.get("model_type") not in AUDIO_TYPES:
        raise unsupported_type(hf.get("model_type"))
    return AudioConfig(
        kind="whisper",
        n_mels=int(hf["num_mel_bins"]),
        max_source_positions=int(hf["max_source_positions"]),
        d_model=int(hf["d_model"]),
        n_layers=int(hf["encoder_layers"]),
        n_heads=int(hf["encoder_attention_heads"]),
        d_ff=int(hf["encoder_ffn_dim"]),
        activation=_activation(hf.get("activation_function", "gelu"), "whisper"),
        norm_eps=1e-5,  # torch.nn.LayerNorm's default; Whisper does not configure it
    )


def audio_to_hf(cfg: AudioConfig) -> dict:
    # The decoder is not ours; a one-layer stub keeps the config valid for WhisperModel / WhisperForConditionalGeneration.
    return {
        "model_type": "whisper",
        "architectures": ["WhisperModel"],
        "num_mel_bins": cfg.n_mels,
        "max_source_positions": cfg.max_source_positions,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_layers,
        "encoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "activation_function": _ACTIVATIONS_BACK.get(cfg.activation, cfg.activation),
        "decoder_layers": 1,
        "decoder_attention_heads": cfg.n_heads,
        "decoder_ffn_dim": cfg.d_ff,
        "max_target_positions": 448,
        "vocab_size": 51865,
        "pad_token_id": 50256,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "decoder_start_token_id": 50257,
    }


def llava_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type") != "llava":
        raise unsupported_type(hf.get("model_type"))
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"llava: unsupported vision_feature_select_strategy={strategy!r}; supported: default, full")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"llava: vision_feature_layer={layer!r} (several layers concatenated) is not supported")
    if not hf.get("multimodal_projector_bias", True):
        raise ValueError("llava: multimodal_projector_bias=False is not supported (the mlp projector has biases)")
    llm = llm_from_hf(hf["text_config"])
    if strategy == "default" and hf["vision_config"].get("model_type", "").startswith("siglip"):
        raise ValueError("llava: vision_feature_select_strategy='default' drops the first token, which for SigLIP "
                         "(no class token) is a patch; only 'full' is supported with a SigLIP tower")
    vision = vision_from_hf(hf["vision_config"], select_layer=layer, drop_class_token=strategy == "default")
    projector = ProjectorConfig(kind="mlp", hidden_dim=llm.d_model,
                                activation=_activation(hf.get("projector_hidden_act", "gelu"), "llava projector"))
    return ModelConfig(
        llm=llm,
        encoders={VISION_NAME: vision},
        projectors={VISION_NAME: projector},
        placeholder_ids={VISION_NAME: int(hf.get("image_token_index", hf.get("image_token_id", 32000)))},
        # The pretrained LLaVA attends causally over its image tokens; see mllm_jax.data.processor for spans.
    )


def llava_to_hf(cfg: ModelConfig) -> dict:
    if set(cfg.encoders) != {VISION_NAME} or set(cfg.projectors) != {VISION_NAME}:
        raise ValueError(
            f"LLaVA export needs exactly one encoder and projector named {VISION_NAME!r}; got encoders "
            f"{sorted(cfg.encoders)} and projectors {sorted(cfg.projectors)}"
        )
    vision, proj = cfg.encoders[VISION_NAME], cfg.projectors[VISION_NAME]
    if proj.kind != "mlp" or (proj.hidden_dim or cfg.llm.d_model) != cfg.llm.d_model:
        raise ValueError(f"LLaVA export needs an mlp projector with hidden_dim = LLM d_model; got {proj}")
    strategy = "default" if vision.class_token and vision.drop_class_token else "full"
    image_tokens = vision.num_features
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": llm_to_hf(cfg.llm),
        "vision_config": vision_to_hf(vision),
        "image_token_index": cfg.placeholder_ids[VISION_NAME],
        "image_token_id": cfg.placeholder_ids[VISION_NAME],
        "image_seq_length": image_tokens,
        "projector_hidden_act": _ACTIVATIONS_BACK.get(proj.activation, proj.activation),
        "vision_feature_select_strategy": strategy,
        "vision_feature_layer": vision.select_layer,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


# Gemma 3's image placeholder, begin- and end-of-image tokens (Gemma3Config's defaults: the released checkpoints').
GEMMA3_TOKENS = {"image_token_index": 262144, "boi_token_index": 255999, "eoi_token_index": 256000}
# transformers' Gemma3TextConfig defaults: the released checkpoints' config.json leave these out of text_config.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                            query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6, rope_local_base_freq=1e4)


def gemma3_from_hf(hf: dict) -> ModelConfig:
    """Gemma3ForConditionalGeneration: a SigLIP tower's last_hidden_state (no class token, post_layernorm applied),
    the "gemma3" pooling projector (mm_tokens_per_image tokens per image) and the gemma3_text LLM. Each image's
    placeholder run is one span: HF's token_type_ids mask lets an image's tokens see each other both ways."""
    if hf.get("model_type") != "gemma3":
        raise unsupported_type(hf.get("model_type"))
    vision_hf = {"model_type": "siglip_vision_model", **hf["vision_config"]}
    if vision_hf["model_type"] != "siglip_vision_model":
        raise ValueError(f"gemma3: vision_config model_type={vision_hf['model_type']!r}; only a SigLIP tower "
                         f"(siglip_vision_model) is supported")
    vision = vision_from_hf(vision_hf)
    llm = llm_from_hf({"model_type": "gemma3_text", **GEMMA3_TEXT_DEFAULTS,
                       "tie_word_embeddings": hf.get("tie_word_embeddings", True), **hf["text_config"]})
    tokens = {k: int(hf.get(k, hf.get(k.replace("_index", "_id"), v))) for k, v in GEMMA3_TOKENS.items()}
    projector = ProjectorConfig(kind="gemma3", tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
                                norm_eps=vision.norm_eps, boi_token_id=tokens["boi_token_index"],
                                eoi_token_id=tokens["eoi_token_index"])
    n = projector.output_tokens(vision.num_features)  # refuses a patch grid that does not pool to it
    if llm.sliding_window is not None and n > llm.sliding_window:
        # HF's local layers AND the window with the image block; our rule lets a span through the window. They agree
        # while one image's tokens all lie within one window.
        raise ValueError(f"gemma3: mm_tokens_per_image={n} exceeds the text sliding_window={llm.sliding_window}; "
                         f"an image's bidirectional span must fit in one window")
    return ModelConfig(llm=llm, encoders={VISION_NAME: vision}, projectors={VISION_NAME: projector},
                       placeholder_ids={VISION_NAME: tokens["image_token_index"]}, media_attention="bidirectional")


def gemma3_to_hf(cfg: ModelConfig) -> dict:
    """The inverse of gemma3_from_hf; refuses a ModelConfig Gemma3ForConditionalGeneration cannot express."""
    if set(cfg.encoders) != {VISION_NAME} or set(cfg.projectors) != {VISION_NAME}:
        raise ValueError(f"Gemma 3 export needs exactly one encoder and projector named {VISION_NAME!r}; got encoders "
                         f"{sorted(cfg.encoders)} and projectors {sorted(cfg.projectors)}")
    vision, proj = cfg.encoders[VISION_NAME], cfg.projectors[VISION_NAME]
    if proj.kind != "gemma3":
        raise ValueError(f"Gemma 3 export needs the 'gemma3' projector; got kind={proj.kind!r}")
    if not isinstance(vision, VisionConfig) or vision.kind != "siglip" or vision.class_token or not vision.post_norm \
            or vision.select_layer != -1:
        raise ValueError(f"Gemma 3 export needs a SigLIP tower's last_hidden_state (kind 'siglip', no class token, "
                         f"post_norm, select_layer -1); got {vision}")
    if proj.norm_eps != vision.norm_eps:
        raise ValueError(f"Gemma 3's mm_soft_emb_norm takes the vision tower's layer_norm_eps ({vision.norm_eps}); "
                         f"the projector has norm_eps={proj.norm_eps}")
    if cfg.media_attention != "bidirectional" or cfg.span_isolated:
        raise ValueError(f"Gemma 3 lets an image's tokens see each other both ways and see the text before them; got "
                         f"media_attention={cfg.media_attention!r}, span_isolated={cfg.span_isolated}")
    proj.output_tokens(vision.num_features)
    image = cfg.placeholder_ids[VISION_NAME]
    boi = proj.boi_token_id if proj.boi_token_id is not None else GEMMA3_TOKENS["boi_token_index"]
    eoi = proj.eoi_token_id if proj.eoi_token_id is not None else GEMMA3_TOKENS["eoi_token_index"]
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": llm_to_hf(cfg.llm, "gemma3_text"),
        "vision_config": vision_to_hf(vision),
        "mm_tokens_per_image": proj.tokens_per_image,
        "image_token_index": image,
        "boi_token_index": boi,
        "eoi_token_index": eoi,
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


# Qwen2-VL's special tokens (Qwen2VLConfig's defaults: the released checkpoints'). The processor writes
# <vision_start> <image_pad>*n <vision_end> for an image and the same with <video_pad> for a video.
QWEN2VL_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}
# Keys of a qwen2_vl config.json that are not the text model's (the hub's flat layout keeps the text fields at the
# top level beside these).
_QWEN2VL_OUTER = ("model_type", "architectures", "text_config", "vision_config", *QWEN2VL_TOKENS, "vision_token_id")


def qwen2vl_from_hf(hf: dict) -> ModelConfig:
    """Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration: the native-resolution tower with its
    patch merger (modality "vision") and the M-RoPE Qwen2 LLM, placeholder tokens attending causally (HF has no
    image mask). Images and videos share the modality: its placeholder is image_token_id (what our data writes for
    both) and HF's video_token_id an alias of it (ModelConfig.placeholder_aliases: a tokenizer's <|video_pad|> runs
    are placeholders too; the features replace either id, so the LLM never sees it). vision_start / vision_end are
    kept on the projector config (boi_token_id / eoi_token_id) for the processor and the export."""
    kind = hf.get("model_type")
    if kind not in NATIVE_VISION_TYPES:
        raise unsupported_type(kind)
    # transformers 5 nests the text model in text_config; the hub's (transformers 4) config.json is flat.
    text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k not in _QWEN2VL_OUTER})
    # HF's rule: the outer tie_word_embeddings, or (saves before transformers 5) the text config's.
    tie = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    llm = llm_from_hf({**text, "model_type": f"{kind}_text", "tie_word_embeddings": tie})
    tower, projector = native_vision_from_hf(hf["vision_config"], kind)
    out = hf["vision_config"].get("out_hidden_size" if kind == "qwen2_5_vl" else "hidden_size", llm.d_model)
    if int(out) != llm.d_model:
        raise ValueError(f"{kind}: the vision merger's output width ({out}) must equal the text hidden_size "
                         f"({llm.d_model})")
    tokens = {k: int(hf.get(k, v)) for k, v in QWEN2VL_TOKENS.items()}
    if tokens["video_token_id"] == tokens["image_token_id"]:
        raise ValueError(f"{kind}: video_token_id={tokens['video_token_id']} equals image_token_id; HF's processor "
                         f"writes two different ids")
    projector = dataclasses.replace(projector, boi_token_id=tokens["vision_start_token_id"],
                                    eoi_token_id=tokens["vision_end_token_id"])
    return ModelConfig(llm=llm, encoders={VISION_NAME: tower}, projectors={VISION_NAME: projector},
                       placeholder_ids={VISION_NAME: tokens["image_token_id"]},
                       placeholder_aliases={tokens["video_token_id"]: VISION_NAME}, media_attention="causal")


_QWEN2VL_ARCHS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def qwen2vl_to_hf(cfg: ModelConfig) -> dict:
    """The inverse of qwen2vl_from_hf (transformers 5's nested layout); refuses what HF cannot express."""
    if set(cfg.encoders) != {VISION_NAME} or set(cfg.projectors) != {VISION_NAME}:
        raise ValueError(f"Qwen2-VL export needs exactly one encoder and projector named {VISION_NAME!r}; got "
                         f"encoders {sorted(cfg.encoders)} and projectors {sorted(cfg.projectors)}")
    tower, proj = cfg.encoders[VISION_NAME], cfg.projectors[VISION_NAME]
    if not isinstance(tower, NativeVisionConfig):
        raise ValueError(f"Qwen2-VL export needs a NativeVisionConfig tower; got {type(tower).__name__}")
    if cfg.media_attention != "causal" or cfg.span_isolated:
        raise ValueError(f"Qwen2-VL attends causally over its image tokens; got media_attention="
                         f"{cfg.media_attention!r}, span_isolated={cfg.span_isolated}")
    if cfg.llm.mrope_section is None:
        raise ValueError("Qwen2-VL export needs an M-RoPE LLM (LLMConfig.mrope_section)")
    kind = tower.kind
    vision = native_vision_to_hf(tower, dataclasses.replace(proj, boi_token_id=None, eoi_token_id=None),
                                 cfg.llm.d_model)
    image = cfg.placeholder_ids[VISION_NAME]
    aliases = [i for i in cfg.placeholder_tokens(VISION_NAME) if i != image]
    if len(aliases) > 1 or set(cfg.placeholder_aliases.values()) - {VISION_NAME}:
        raise ValueError(f"Qwen2-VL has one more placeholder id (video_token_id) for modality {VISION_NAME!r}; got "
                         f"placeholder_aliases {cfg.placeholder_aliases}")
    video = aliases[0] if aliases else image + 1  # transformers' default relation (151655 / 151656)
    start = proj.boi_token_id if proj.boi_token_id is not None else QWEN2VL_TOKENS["vision_start_token_id"]
    end = proj.eoi_token_id if proj.eoi_token_id is not None else QWEN2VL_TOKENS["vision_end_token_id"]
    return {
        "model_type": kind,
        "architectures": [_QWEN2VL_ARCHS[kind]],
        "text_config": llm_to_hf(cfg.llm, f"{kind}_text"),
        "vision_config": vision,
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


def config_from_hf(hf: dict):
    """Any supported HF config dict -> LLMConfig | VisionConfig | AudioConfig | ModelConfig."""
    model_type = hf.get("model_type")
    if model_type in LLM_TYPES:
        return llm_from_hf(hf)
    if model_type in ("clip", "siglip"):  # a full CLIP/SigLIP checkpoint: take its vision tower
        return vision_from_hf({**hf["vision_config"], "model_type": f"{model_type}_vision_model"})
    if model_type in VISION_TYPES:
        return vision_from_hf(hf)
    if model_type in AUDIO_TYPES:
        return audio_from_hf(hf)
    if model_type == "gemma3":
        return gemma3_from_hf(hf)
    if model_type in NATIVE_VISION_TYPES:
        return qwen2vl_from_hf(hf)
    if model_type in MULTIMODAL_TYPES:
        return llava_from_hf(hf)
    raise unsupported_type(model_type)
