"""LoRA settings per module: which modules get adapters, with which rank, targets and scale (alpha / rank).

The adapters themselves live in ``layers.Linear`` (``lora_a`` [in..., r], ``lora_b`` [r, out...] = 0, so a fresh
adapter is the identity) as ``layers.LoRAParam``; ``freeze.trainable_filter`` then trains only them.
"""

from __future__ import annotations

from mllm_jax.config import LoRAConfig, ModelConfig
from mllm_jax.encoder import ENCODER_LORA_TARGETS
from mllm_jax.layers import LoRAParam  # noqa: F401  (re-exported)


def lora_for(config: ModelConfig, module: str) -> LoRAConfig | None:
    """The LoRA config of "llm" or an encoder name, or None when that module has no adapters."""
    lora = config.lora
    if lora is None or module not in lora.modules:
        return None
    if lora.rank <= 0:
        raise ValueError(f"LoRA rank must be positive; got {lora.rank}")
    return lora


def validate(config: ModelConfig) -> None:
    lora = config.lora
    if lora is None:
        return
    known = {"llm", *config.encoders}
    bad = [m for m in lora.modules if m not in known]
    if bad:
        raise ValueError(f"LoRA modules {bad} are not 'llm' or an encoder name {sorted(config.encoders)}")


def encoder_targets(lora: LoRAConfig) -> tuple:
    """LLM-style target names mapped to the encoder layer's projections (gate/up -> fc1, down -> fc2)."""
    alias = {"gate": "fc1", "up": "fc1", "down": "fc2"}
    return tuple(sorted({alias.get(t, t) for t in lora.targets} & set(ENCODER_LORA_TARGETS)))
