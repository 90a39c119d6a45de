"""The one check of a parallel layout against the model, before anything is built or compiled.

The mesh alone (axis sizes, device count) is parallel.mesh.validate's; this adds what depends on the model's modules:
the LLM's and every encoder's attention heads against `tensor`, the LLM's layers against the pipeline stages, and
what the pipelined step cannot run. Every error names the values given.
"""

from __future__ import annotations

from mllm_jax.parallel import mesh
from mllm_jax.parallel.config import check_stage_layers
from mllm_jax.parallel.schedule import VIRTUAL_SCHEDULES


def validate_layout(parallel_config, model_config, num_devices: int | None = None) -> None:
    """Refuse a ParallelConfig that ``model_config`` (a ModelConfig) cannot take; ``num_devices``: also check the
    mesh's device count (None when the devices are given later, e.g. to make_mesh)."""
    pc, llm = parallel_config, model_config.llm
    mesh.validate(pc, num_devices)
    if pc.pipeline > 1 and llm.n_layers < pc.pipeline:
        raise ValueError(f"LLMConfig.n_layers={llm.n_layers} is fewer than ParallelConfig.pipeline={pc.pipeline} "
                         f"stages")
    if pc.pipeline > 1 and pc.pipeline_schedule in VIRTUAL_SCHEDULES:
        chunks = pc.chunks_per_device()
        if llm.n_layers < pc.pipeline * chunks:
            raise ValueError(f"ParallelConfig.pipeline_schedule={pc.pipeline_schedule!r} runs {chunks} chunks of "
                             f"layers per stage: LLMConfig.n_layers={llm.n_layers} is fewer than "
                             f"ParallelConfig.pipeline={pc.pipeline} x {chunks}")
        M = pc.microbatches
        if pc.pipeline_schedule == "interleaved" and isinstance(M, int) and M > 0 and M % pc.pipeline:
            raise ValueError(f"ParallelConfig.pipeline_schedule='interleaved' takes the microbatches in groups of "
                             f"ParallelConfig.pipeline={pc.pipeline}: ParallelConfig.microbatches={M} is not a "
                             f"multiple of it")
    if pc.pipeline_stage_layers is not None:
        check_stage_layers(pc, llm.n_layers)
    if llm.n_experts and llm.n_experts % pc.expert:
        raise ValueError(f"LLMConfig.n_experts={llm.n_experts} is not divisible by ParallelConfig.expert={pc.expert}")
    if pc.pipeline > 1 and 0 < len(llm.moe_layers) < llm.n_layers:
        raise ValueError(f"ParallelConfig.pipeline={pc.pipeline} needs every LLM layer of one kind; LLMConfig has MoE "
                         f"layers {llm.moe_layers} of {llm.n_layers} (moe_layer_freq={llm.moe_layer_freq}, "
                         f"moe_first_dense_layers={llm.moe_first_dense_layers}): pipeline stages stack one layer kind")
    heads = {"LLMConfig.n_heads": llm.n_heads, "LLMConfig.n_kv_heads": llm.n_kv_heads}
    heads.update({f"encoders[{name!r}].n_heads": enc.n_heads for name, enc in model_config.encoders.items()})
    for what, n in heads.items():
        if n % pc.tensor:
            raise ValueError(f"{what}={n} is not divisible by ParallelConfig.tensor={pc.tensor}")
