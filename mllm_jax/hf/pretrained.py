"""``load_pretrained`` / ``save_pretrained``: Hugging Face directories (config.json + safetensors) <-> our modules.

What a directory becomes (by its config.json ``model_type``):
- llama / qwen2 / mistral / gemma / gemma2 -> mllm_jax.LLM: ``model(input_ids) -> logits [B, S, V]``;
- clip_vision_model / siglip_vision_model (or a full clip / siglip) -> mllm_jax.VisionEncoder:
  ``model(pixels [N, H, W, C]) -> last_hidden_state [N, tokens, D]``;
- whisper -> mllm_jax.AudioEncoder: ``model(log_mel [N, frames, n_mels]) -> last_hidden_state``;
- llava -> mllm_jax.MultimodalModel (encoder "vision", mlp projector, LLM): ``model(batch) -> hidden``,
  ``model.llm.logits(hidden)``;
- gemma3 -> mllm_jax.MultimodalModel (SigLIP encoder "vision", gemma3 pooling projector, Gemma 3 text LLM);
- qwen2_vl / qwen2_5_vl -> mllm_jax.MultimodalModel (native-resolution encoder "vision" taking packed patch rows,
  patch_merger projector, M-RoPE Qwen2 LLM; docs/native_resolution.md).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from mllm_jax.config import AudioConfig, LLMConfig, LoRAConfig, ModelConfig, NativeVisionConfig, VisionConfig
from mllm_jax.hf import config_map as cm
from mllm_jax.hf import weight_maps as wm
from mllm_jax.hf.safetensors_io import CheckpointReader, MissingFileError, write_checkpoint
from mllm_jax.hf.streaming import _path, load_into


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise MissingFileError(f"pretrained directory not found: {path}")
    if not os.path.isfile(file):
        raise MissingFileError(f"config.json not found: {file}")
    with open(file) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- module factories


def _make(config, *, seed: int, lora: LoRAConfig | None):
    """(constructor of our module for this config, its name for messages)."""
    from mllm_jax.audio import AudioEncoder
    from mllm_jax.llm import LLM
    from mllm_jax.multimodal import MultimodalModel
    from mllm_jax.vision import VisionEncoder

    if isinstance(config, LLMConfig):
        return lambda: LLM(config, rngs=nnx.Rngs(seed), lora=lora)
    if isinstance(config, VisionConfig):
        return lambda: VisionEncoder(config, rngs=nnx.Rngs(seed))
    if isinstance(config, AudioConfig):
        return lambda: AudioEncoder(config, rngs=nnx.Rngs(seed))
    return lambda: MultimodalModel(config, rngs=nnx.Rngs(seed))


# Tensors a checkpoint may hold that no module of ours reads, by design (not weights the config forgot).
_BENIGN = (
    "rotary_emb.inv_freq",  # RoPE buffers saved by older transformers; we compute them
    "embeddings.position_ids",  # CLIP/SigLIP index buffers
    "embed_positions.weight",  # Whisper's fixed sinusoids: computed, checked by _check_whisper_positions
)


def _parts(config, keys) -> list[tuple[str, list[wm.Rule], int, tuple]]:
    """(what, rules, n_layers of its stacked rules, name prefixes it owns) per part of our module for ``config``."""
    if isinstance(config, LLMConfig):
        prefix, head = wm.llm_prefixes(keys)
        return [("LLMConfig", wm.llm_rules(config, prefix, head), config.n_layers, (prefix, head))]
    if isinstance(config, VisionConfig):
        prefix = wm.vision_prefix(keys)
        return [("VisionConfig", wm.vision_rules(config, prefix), config.n_layers, (prefix,))]
    if isinstance(config, AudioConfig):
        prefix = wm.whisper_prefix(keys)
        return [("AudioConfig", wm.whisper_rules(config, prefix), config.n_layers, (prefix,))]
    (name,) = config.encoders
    llm_prefix, head = wm.llm_prefixes(keys)
    if isinstance(config.encoders[name], NativeVisionConfig):
        return _native_parts(config, name, keys, llm_prefix, head)
    vision_prefix = wm.vision_prefix(keys)
    projector_rules, projector_prefix = _projector_rules(config.projectors[name], keys)
    return [("llm (LLMConfig)", wm.under("llm", wm.llm_rules(config.llm, llm_prefix, head)), config.llm.n_layers,
             (llm_prefix, head)),
            (f"encoders[{name!r}] (VisionConfig)",
             wm.under(f"encoders/{name}", wm.vision_rules(config.encoders[name], vision_prefix)),
             config.encoders[name].n_layers, (vision_prefix,)),
            (f"projectors[{name!r}]", wm.under(f"projectors/{name}", projector_rules), 0, (projector_prefix,))]


def _native_parts(config, name: str, keys, llm_prefix: str, head: str) -> list:
    """The parts of a Qwen2-VL / Qwen2.5-VL checkpoint: the merger lives under the tower's prefix ("visual." in the
    hub's names, "model.visual." in transformers 5's module names), so the tower part owns it too."""
    prefix = wm.native_vision_prefix(keys)
    enc, proj = config.encoders[name], config.projectors[name]
    return [("llm (LLMConfig)", wm.under("llm", wm.llm_rules(config.llm, llm_prefix, head)), config.llm.n_layers,
             (llm_prefix, head)),
            (f"encoders[{name!r}] (NativeVisionConfig)",
             wm.under(f"encoders/{name}", wm.native_vision_rules(enc, prefix)), enc.n_layers, (prefix,)),
            (f"projectors[{name!r}]", wm.under(f"projectors/{name}", wm.patch_merger_rules(proj, prefix)), 0, ())]


def _projector_rules(config, keys=None) -> tuple[list[wm.Rule], str]:
    """(rules, prefix) of the projector of a LLaVA-layout checkpoint (LLaVA's mlp, Gemma 3's pooling projector);
    ``keys`` None: the prefix we write."""
    gemma3 = config.kind == "gemma3"
    if keys is None:
        prefix = "multi_modal_projector."
    else:
        prefix = wm.gemma3_projector_prefix(keys) if gemma3 else wm.projector_prefix(keys)
    return (wm.gemma3_projector_rules(prefix) if gemma3 else wm.mlp_projector_rules(prefix)), prefix


def _benign(name: str, config) -> bool:
    if name.endswith(_BENIGN):
        return True
    # CLIP's post_layernorm feeds only the pooled output, which no tower of ours returns (LLaVA reads a hidden layer).
    vision = [c for c in ([config] if isinstance(config, VisionConfig) else getattr(config, "encoders", {}).values())
              if isinstance(c, VisionConfig)]
    if any(not v.post_norm for v in vision) and "post_layernorm" in name.split("."):
        return True
    # SigLIP's attention-pooling head ("head.*") likewise feeds only the pooled output.
    if any(v.kind == "siglip" for v in vision) and "head" in name.split("."):
        return True
    llm = config if isinstance(config, LLMConfig) else getattr(config, "llm", None)
    return bool(getattr(llm, "tie_embeddings", False)) and name.endswith("lm_head.weight")  # tied: the embedding


def rules_for_checkpoint(config, keys, *, allow_unused: bool = False) -> list[wm.Rule]:
    """The weight map of our module for ``config`` against the tensor names ``keys`` of a checkpoint.

    Tensors under the prefixes our module owns that no rule reads (a layer beyond ``n_layers``, a stray or renamed
    weight) are a ValueError naming them, unless ``allow_unused``: a config smaller than its weights must not load
    silently. Tensors of parts we do not build (CLIP's text tower, Whisper's decoder) are outside those prefixes."""
    keys = list(keys)
    parts = _parts(config, keys)
    rules = [r for _, part_rules, _, _ in parts for r in part_rules]
    if allow_unused:
        return rules
    used = {n for _, part_rules, n_layers, _ in parts for r in part_rules for n in r.hf_names(n_layers)}
    owned = tuple(p for _, _, _, prefixes in parts for p in prefixes)
    unused = sorted(k for k in keys if k not in used and k.startswith(owned) and not _benign(k, config))
    if unused:
        layers = "; ".join(f"{what} with n_layers={n}" for what, _, n, _ in parts if n)
        raise ValueError(f"the config ({layers}) does not use {len(unused)} tensor(s) of the checkpoint: "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''}. Fix the config (e.g. its number of "
                         f"layers) or pass allow_unused=True to load only what it uses")
    return rules


def load_pretrained(path: str, *, mesh=None, logical_rules=None, lora: LoRAConfig | None = None, seed: int = 0,
                    config=None, allow_unused: bool = False):
    """A HF save_pretrained directory -> our NNX module (see the module docstring for what each becomes).

    ``mesh`` + ``logical_rules`` (parallel.sharding.logical_rules(...)): parameters are created directly in their
    sharded layout as the tensors stream in. ``lora``: adapters on top of the LLM (initialised, not loaded).
    ``config``: our config to use instead of the one derived from config.json (its shapes are still checked).
    Checkpoint tensors that ``config`` does not use (e.g. layers beyond its n_layers) are a ValueError naming them,
    unless ``allow_unused``.
    """
    hf = read_config(path)
    if config is None:
        config = cm.config_from_hf(hf)
    if lora is not None and isinstance(config, ModelConfig):
        config = config.replace(lora=lora)
    reader = CheckpointReader(path)
    rules = rules_for_checkpoint(config, reader.keys(), allow_unused=allow_unused)
    if isinstance(config, AudioConfig):
        _check_whisper_positions(reader, config)
    return load_into(_make(config, seed=seed, lora=lora if isinstance(config, LLMConfig) else None),
                     [(reader, rules)], mesh=mesh, logical_rules=logical_rules)


def _check_whisper_positions(reader: CheckpointReader, config: AudioConfig) -> None:
    """Our encoder computes Whisper's sinusoidal position table; refuse a checkpoint whose table is different."""
    from mllm_jax.audio import sinusoids

    name = wm.whisper_prefix(reader.keys()) + "embed_positions.weight"
    if name not in reader:
        return
    table = np.asarray(reader.get(name), np.float32)
    want = sinusoids(config.max_source_positions, config.d_model)
    if table.shape != want.shape or np.abs(table - want).max() > 1e-4:
        raise ValueError(f"{name} differs from Whisper's sinusoidal table (shape {table.shape}, expected "
                         f"{want.shape}); learned audio positions are not supported")


# ----------------------------------------------------------------------------------------------------- saving


def _family_config(module):
    from mllm_jax.audio import AudioEncoder
    from mllm_jax.llm import LLM
    from mllm_jax.multimodal import MultimodalModel
    from mllm_jax.vision import VisionEncoder

    if isinstance(module, LLM):
        return module.config, cm.llm_to_hf(module.config), wm.llm_rules(module.config)
    if isinstance(module, VisionEncoder):
        return module.config, cm.vision_to_hf(module.config), wm.vision_rules(module.config)
    if isinstance(module, AudioEncoder):
        return module.config, cm.audio_to_hf(module.config), wm.whisper_rules(module.config)
    if isinstance(module, MultimodalModel):
        cfg = module.config
        name = cm.VISION_NAME
        if isinstance(cfg.encoders.get(name), NativeVisionConfig):
            # The hub's Qwen2-VL layout (visual.*, model.*, lm_head.weight): what transformers 4 reads, and
            # transformers 5 maps to its own (model.visual.*, model.language_model.*) on load.
            rules = (wm.under("llm", wm.llm_rules(cfg.llm, "model.", "lm_head.weight"))
                     + wm.under(f"encoders/{name}", wm.native_vision_rules(cfg.encoders[name], "visual."))
                     + wm.under(f"projectors/{name}", wm.patch_merger_rules(cfg.projectors[name], "visual.")))
            return cfg, cm.qwen2vl_to_hf(cfg), rules
        gemma3 = name in cfg.projectors and cfg.projectors[name].kind == "gemma3"
        hf = cm.gemma3_to_hf(cfg) if gemma3 else cm.llava_to_hf(cfg)
        # The layout of the hub's LLaVA and Gemma 3 checkpoints (vision_tower.vision_model., language_model.model.).
        rules = (wm.under("llm", wm.llm_rules(cfg.llm, "language_model.model.", "language_model.lm_head.weight"))
                 + wm.under(f"encoders/{name}", wm.vision_rules(cfg.encoders[name], "vision_tower.vision_model."))
                 + wm.under(f"projectors/{name}", _projector_rules(cfg.projectors[name])[0]))
        return cfg, hf, rules
    raise cm.unsupported_type(type(module).__name__)


def _merged_lora(flat: dict, scales: dict) -> dict:
    """Base kernels with their LoRA update folded in (W + scale * A @ B), so HF sees the adapted model."""
    out = dict(flat)
    for key in [k for k in flat if k.endswith("/lora_a")]:
        base = key[: -len("lora_a")]
        a, b = flat[key], flat[base + "lora_b"]
        scale = next(s for prefix, s in scales.items() if key.startswith(prefix))
        r = a.shape[-1]
        stack = a.shape[0] if a.ndim > 2 and a.shape[0] == b.shape[0] and base.startswith(("layers", "llm/layers")) \
            else None
        kernel = flat[base + "kernel"]
        if stack:
            delta = np.einsum("lir,lro->lio", a.reshape(stack, -1, r), b.reshape(stack, r, -1))
        else:
            delta = a.reshape(-1, r) @ b.reshape(r, -1)
        out[base + "kernel"] = kernel + scale * delta.reshape(kernel.shape)
        del out[key], out[base + "lora_b"]
    return out


def save_pretrained(module, path: str, *, dtype: str = "float32", max_shard_bytes: int | None = None,
                    model_type: str | None = None) -> None:
    """Write ``path``/config.json + model.safetensors (sharded with an index above ``max_shard_bytes``) that
    transformers loads into the same architecture. LoRA adapters are merged into the weights they adapt."""
    cfg, hf, rules = _family_config(module)
    if model_type is not None and isinstance(cfg, LLMConfig):
        hf = cm.llm_to_hf(cfg, model_type)
    np_dtype = {"float32": np.float32, "bfloat16": __import__("ml_dtypes").bfloat16, "float16": np.float16}[dtype]
    state = nnx.state(module, nnx.Param)
    flat = {_path(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}
    flat = _merged_lora(flat, _lora_scales(module))
    tensors = {}
    for rule in rules:
        value = flat.pop(rule.ours)
        for i in range(value.shape[0]) if rule.stacked else (None,):
            part = rule.layer_tensors(value if i is None else value[i], i)
            tensors.update({k: v.astype(np_dtype) for k, v in part.items()})
    if flat:
        raise ValueError(f"parameters {sorted(flat)} have no Hugging Face name in the {hf['model_type']} map")
    hf["torch_dtype"] = hf["dtype"] = dtype
    os.makedirs(path, exist_ok=True)
    write_checkpoint(path, tensors, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def _lora_scales(module) -> dict:
    """Path prefix -> LoRA scale (alpha / rank) for every module that may hold adapters."""
    from mllm_jax.multimodal import MultimodalModel

    if isinstance(module, MultimodalModel):
        scales = {"llm/": module.llm.run.lora_scale}
        for name, enc in module.encoders.items():
            scales[f"encoders/{name}/"] = enc.run.lora_scale
        return scales
    return {"": module.run.lora_scale}  # the LLM or an encoder alone
