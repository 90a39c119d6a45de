"""Logical axis -> mesh axes rule tables, one per module ("llm", "encoders/<name>", "projectors/<name>").

Every parameter and key activation of mllm_jax carries logical names; these tables map them to the mesh axes
(data, fsdp, expert, pipeline, context, tensor). A name maps to one mesh axis, a tuple of them (used in order, each only where
it divides the dimension) or None (replicated). Extending the layout is adding an entry: e.g. "layers" -> "pipeline" for
pipeline stages. ``ParallelConfig.rules`` overrides
entries per module: {"llm": {"mlp": None}, "encoders/vision": {"batch": "data"}}.
"""

from __future__ import annotations

from mllm_jax.parallel.config import MESH_AXES, ParallelConfig

# Activations: "batch", "length", "act_embed" (the hidden dim of activations, never FSDP-sharded);
# parameters: "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", "lora_rank", ...
LLM_RULES = {
    # `expert` splits the tokens like `data` outside the MoE layers (expert parallelism: inside them each device's
    # tokens travel to their experts' devices by all-to-all, mllm_jax.moe).
    "batch": ("data", "fsdp", "expert"),
    # Under context parallelism every context rank holds only its shard of the (permuted) sequence, so projections,
    # MLPs, norms and the loss run on S/cp tokens per rank; only attention talks across ranks (K/V gathered or ringed).
    "length": "context",
    "act_embed": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "lora_rank": None,
    # MoE (mllm_jax.moe): the routed experts' stack over `expert` (another mesh axis that also splits the batch,
    # e.g. "data", works the same), each expert's hidden over `tensor`; the router whole on every device.
    "experts": "expert",
    "expert_mlp": "tensor",
    "moe_router": None,
}

# Encoders and projectors run outside the LLM's layout: the batch (images, clips) is spread over every mesh axis
# that divides it, parameters are FSDP-stored and gathered whole for compute (no tensor parallelism by default).
ENCODER_RULES = {
    "batch": MESH_AXES,
    "length": None,
    "act_embed": None,
    "embed": "fsdp",
    "embed_in": None,
    "vocab": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "mlp": None,
    "layers": None,
    "lora_rank": None,
    "patch": None,
    "channels": None,
    "positions": None,
    "mel": None,
    "conv_width": None,
    "conv_in": None,
    "queries": None,
}


def default_rules(module: str) -> dict:
    if module == "llm":
        return dict(LLM_RULES)
    if module.startswith("encoders/") or module.startswith("projectors/"):
        return dict(ENCODER_RULES)
    raise ValueError(f"module must be 'llm', 'encoders/<name>' or 'projectors/<name>'; got {module!r}")


def _check_axes(module: str, name: str, axes) -> None:
    for ax in (axes,) if isinstance(axes, str) else (axes or ()):
        if ax not in MESH_AXES:
            raise ValueError(f"rules[{module!r}][{name!r}] names mesh axis {ax!r}, not one of {MESH_AXES}")


def logical_rules(module: str, parallel_config: ParallelConfig) -> tuple:
    """((logical name, mesh axes), ...) for ``module``, the defaults updated by ``parallel_config.rules[module]``."""
    rules = default_rules(module)
    if module == "llm" and parallel_config.pipeline > 1:
        # Each pipeline device stores only its own block of the stacked decoder layers (and their optimizer
        # moments); the pipeline runtime maps blocks to stages (parallel.pipeline.to_stages). Applied where the
        # axis divides n_layers (partitioning.spec), otherwise the layers stay replicated.
        rules["layers"] = "pipeline"
    for name, axes in (parallel_config.rules or {}).get(module, {}).items():
        _check_axes(module, name, axes)
        rules[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(rules.items())


def rule_table(model_config, parallel_config: ParallelConfig) -> tuple:
    """((module key, rules), ...) for every part of a ModelConfig: what MultimodalModel(rule_table=...) takes."""
    keys = ["llm"] + [f"{kind}/{n}" for n in sorted(model_config.encoders) for kind in ("encoders", "projectors")]
    unknown = [k for k in (parallel_config.rules or {}) if k not in keys]
    if unknown:
        raise ValueError(f"ParallelConfig.rules has modules {unknown}; the model has {keys}")
    return tuple((k, logical_rules(k, parallel_config)) for k in keys)
