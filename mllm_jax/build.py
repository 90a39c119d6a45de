"""Building the model on a mesh: parameters created already sharded (under jit, per-module logical rules)."""

from __future__ import annotations

import jax
from flax import nnx

from mllm_jax.config import ModelConfig
from mllm_jax.multimodal import MultimodalModel


def _table(config: ModelConfig, parallel_config):
    from mllm_jax.layout import validate_layout
    from mllm_jax.parallel.sharding import rule_table

    validate_layout(parallel_config, config)
    return rule_table(config, parallel_config)


def create_model(config: ModelConfig, mesh, parallel_config, seed: int = 0) -> MultimodalModel:
    """The sharded model: every variable created under ``jax.set_mesh(mesh)`` with its module's rules in force."""
    table = _table(config, parallel_config)
    method = parallel_config.context_config.attention

    @nnx.jit
    def init():
        return MultimodalModel(config, rngs=nnx.Rngs(seed), rule_table=table, context_method=method)

    with jax.set_mesh(mesh):
        return init()


def abstract_model(config: ModelConfig, mesh, parallel_config, seed: int = 0) -> MultimodalModel:
    """The same model with jax.ShapeDtypeStruct leaves (shapes and shardings only): dry runs, checkpoint restore."""
    table = _table(config, parallel_config)
    method = parallel_config.context_config.attention
    with jax.set_mesh(mesh):
        return nnx.eval_shape(lambda: MultimodalModel(config, rngs=nnx.Rngs(seed), rule_table=table,
                                                      context_method=method))
