"""Recipes that start from pretrained Hugging Face weights.

gin bindings (after ``register()``):

    PretrainedConfig.llm = "/ckpt/llama"                      # an HF LLM directory -> ModelConfig.llm + weights
    PretrainedConfig.encoders = {"vision": "/ckpt/clip"}      # modality -> HF CLIP/SigLIP/Whisper directory
    PretrainedConfig.model = "/ckpt/llava"                    # or: a whole LLaVA / Gemma 3 / Qwen2-VL

The architecture of each pretrained part comes from its config.json; the recipe's ModelConfig keeps what HF does not
say: projectors (fresh unless ``model`` is given), placeholder ids, which parts train (``ModelConfig.trainable``),
LoRA (``ModelConfig.lora``: adapters initialised on top of the loaded weights), the vision feature layer
(``VisionConfig.select_layer`` / ``drop_class_token``), a native tower's packing and processor settings
(``NativeVisionConfig.patches_per_row`` / ``min_pixels`` / ``max_pixels`` / ``fps``), dtype and remat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flax import nnx

from mllm_jax.config import AudioConfig, ModelConfig, NativeVisionConfig, VisionConfig
from mllm_jax.hf import config_map as cm
from mllm_jax.hf import weight_maps as wm
from mllm_jax.hf.pretrained import read_config, rules_for_checkpoint
from mllm_jax.hf.safetensors_io import CheckpointReader
from mllm_jax.hf.streaming import load_into


@dataclass(frozen=True)
class PretrainedConfig:
    model: str | None = None
    llm: str | None = None
    encoders: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.model is None and self.llm is None and not self.encoders


_REGISTERED = {}


def register():
    """Idempotent: make PretrainedConfig gin-configurable under that name; returns the configurable class."""
    import gin

    if not _REGISTERED:
        _REGISTERED["cls"] = gin.external_configurable(PretrainedConfig, name="PretrainedConfig")
    return _REGISTERED["cls"]


def build_pretrained_config() -> PretrainedConfig:
    """The PretrainedConfig the gin bindings in force describe (a plain instance)."""
    built = register()()
    return PretrainedConfig(model=built.model, llm=built.llm, encoders=dict(built.encoders))


def resolve_model_config(config: ModelConfig, pretrained: PretrainedConfig) -> ModelConfig:
    """The recipe's ModelConfig with every pretrained part's architecture taken from its config.json."""
    if pretrained.model is not None:
        if pretrained.llm is not None or pretrained.encoders:
            raise ValueError("PretrainedConfig.model (a whole LLaVA) excludes PretrainedConfig.llm/encoders; got "
                             f"llm={pretrained.llm!r}, encoders={pretrained.encoders}")
        hf = read_config(pretrained.model)
        whole = cm.config_from_hf(hf)
        if not isinstance(whole, ModelConfig):
            raise ValueError(f"PretrainedConfig.model must be a multimodal (llava, gemma3, qwen2_vl, qwen2_5_vl) "
                             f"directory; {pretrained.model} "
                             f"holds model_type={hf.get('model_type')!r}")
        keep = {f: getattr(config, f) for f in ("trainable", "lora", "span_isolated", "dtype", "remat",
                                                "attention_impl")}
        return whole.replace(**keep, encoders=_keep_native_settings(whole.encoders, config.encoders))
    cfg = config
    if pretrained.llm is not None:
        llm = cm.config_from_hf(read_config(pretrained.llm))
        if not isinstance(llm, type(cfg.llm)):
            raise ValueError(f"PretrainedConfig.llm={pretrained.llm!r} is not an LLM checkpoint")
        cfg = cfg.replace(llm=llm)
    encoders = dict(cfg.encoders)
    for name, path in pretrained.encoders.items():
        if name not in encoders:
            raise ValueError(f"PretrainedConfig.encoders names {name!r}, which ModelConfig.encoders does not have "
                             f"({sorted(encoders)})")
        ours = encoders[name]
        hf_cfg = cm.config_from_hf(read_config(path))
        if isinstance(hf_cfg, VisionConfig) and isinstance(ours, VisionConfig):
            hf_cfg = dataclasses.replace(hf_cfg, select_layer=ours.select_layer,
                                         drop_class_token=ours.drop_class_token and hf_cfg.class_token)
        elif not isinstance(hf_cfg, (VisionConfig, AudioConfig)) or type(hf_cfg) is not type(ours):
            raise ValueError(f"encoder {name!r}: {path} holds a {type(hf_cfg).__name__}, the recipe a "
                             f"{type(ours).__name__}")
        encoders[name] = hf_cfg
    return cfg.replace(encoders=encoders)


# A native-resolution tower's packing and processor settings: config.json does not hold them (the recipe does).
NATIVE_RUN_FIELDS = ("patches_per_row", "min_pixels", "max_pixels", "fps")


def _keep_native_settings(loaded: dict, recipe: dict) -> dict:
    """The checkpoint's encoders, each NativeVisionConfig keeping the recipe's NATIVE_RUN_FIELDS."""
    out = dict(loaded)
    for name, enc in loaded.items():
        ours = recipe.get(name)
        if isinstance(enc, NativeVisionConfig) and isinstance(ours, NativeVisionConfig):
            out[name] = dataclasses.replace(enc, **{f: getattr(ours, f) for f in NATIVE_RUN_FIELDS})
    return out


def create_pretrained_model(config: ModelConfig, mesh, parallel_config, pretrained: PretrainedConfig,
                            seed: int = 0):
    """(MultimodalModel with pretrained weights streamed into its sharded layout, the resolved ModelConfig).

    The counterpart of mllm_jax.build.create_model: parts without a checkpoint (fresh projectors, LoRA adapters,
    encoders not named in ``pretrained``) get their usual initialisation.
    """
    from mllm_jax.multimodal import MultimodalModel
    from mllm_jax.layout import validate_layout
    from mllm_jax.parallel.sharding import rule_table

    cfg = resolve_model_config(config, pretrained)
    validate_layout(parallel_config, cfg)
    table = rule_table(cfg, parallel_config)
    method = parallel_config.context_config.attention

    def make():
        return MultimodalModel(cfg, rngs=nnx.Rngs(seed), rule_table=table, context_method=method)

    sources, loaded = [], []
    if pretrained.model is not None:
        reader = CheckpointReader(pretrained.model)
        sources.append((reader, rules_for_checkpoint(cfg, reader.keys())))
        loaded += ["llm/", *(f"encoders/{n}/" for n in cfg.encoders), *(f"projectors/{n}/" for n in cfg.encoders)]
    if pretrained.llm is not None:
        reader = CheckpointReader(pretrained.llm)
        sources.append((reader, wm.under("llm", rules_for_checkpoint(cfg.llm, reader.keys()))))
        loaded.append("llm/")
    for name, path in pretrained.encoders.items():
        reader = CheckpointReader(path)
        sources.append((reader, wm.under(f"encoders/{name}", rules_for_checkpoint(cfg.encoders[name],
                                                                                   reader.keys()))))
        loaded.append(f"encoders/{name}/")
    model = load_into(make, sources, mesh=mesh, init_missing=lambda path: not path.startswith(tuple(loaded)))
    return model, cfg
