"""--dry_run: build the model abstractly (nnx.eval_shape, nothing allocated) and report the mesh, parameter counts
and a per-device memory estimate.

Parameters, gradients and AdamW moments are counted exactly per device from the abstract arrays' shardings.
Activations are a rough model (saved tensors per layer per token), stated as such.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from mllm_jax.data.batching import feature_counts
from mllm_jax.parallel.config import AUTO
from mllm_jax.train import loop
from mllm_jax.train.microbatch_choice import microbatch_plan, pricing_chip, row_shapes
from mllm_jax.train.targets import gives_costs

GiB = 2.0**30


def _per_device_bytes(x) -> float:
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = sharding.shard_shape(shape)
    return float(np.prod(shape)) * np.dtype(x.dtype).itemsize


def _bytes(tree) -> float:
    return sum(_per_device_bytes(x) for x in jax.tree.leaves(tree))


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def llm_tokens_per_device(cfg: loop.RunConfig) -> float:
    """LLM tokens a device holds per microbatch: its rows x the sequence as the context plan pads it
    (compile_target.context_length: ContextConfig.block, "auto" as this host resolves it), over the context ranks."""
    from mllm_jax.train.compile_target import context_length

    return _device_rows(cfg) * context_length(cfg) / cfg.parallel.context


def _device_rows(cfg: loop.RunConfig) -> float:
    pc = cfg.parallel
    return cfg.data.batch_size / pc.microbatches / (pc.data * pc.fsdp)


def activation_estimate(cfg: loop.RunConfig) -> float:
    """Bytes per device of activations saved for the backward of one microbatch (rough)."""
    pc, mc, dc = cfg.parallel, cfg.model, cfg.data
    act_bytes = 2 if mc.dtype == "bfloat16" else 4
    rows = _device_rows(cfg)
    remat = mc.remat != "none"

    def one_layer(tokens, d, d_ff):  # every tensor a layer's backward needs
        return tokens * (6 * d + 3 * d_ff / max(pc.tensor, 1)) * act_bytes

    def stack(tokens, d, d_ff, layers, heads):
        per_layer = tokens * d * act_bytes if remat else one_layer(tokens, d, d_ff)
        return layers * per_layer + (one_layer(tokens, d, d_ff) if remat else 0.0)  # + the recomputed layer

    llm = mc.llm
    tokens = llm_tokens_per_device(cfg)
    if pc.pipeline > 1:
        # A device runs its stage's layers only, and 1F1B keeps every slot's input for at most `stages`
        # microbatches in flight (the backward rematerialises each layer from its saved input).
        layers = math.ceil(llm.n_layers / pc.pipeline)
        in_flight = min(pc.pipeline, pc.microbatches)
        total = in_flight * layers * tokens * llm.d_model * act_bytes
        total += one_layer(tokens, llm.d_model, llm.d_ff)
    else:
        total = stack(tokens, llm.d_model, llm.d_ff, llm.n_layers, llm.n_heads)
    counts = feature_counts(mc)
    for name, enc in mc.encoders.items():
        if not mc.is_trainable(f"encoders/{name}"):
            continue  # frozen encoders run under stop_gradient: nothing saved
        slots = dc.max_images if name == "vision" else dc.max_audio
        # A native-resolution slot is a patch row (compile_target.batch_shapes): patches_per_row tokens.
        tokens = enc.patches_per_row if mc.is_native_resolution(name) else counts[name]
        total += stack(rows * slots * tokens, enc.d_model, enc.d_ff, enc.n_layers, enc.n_heads)
    return total


def report(cfg: loop.RunConfig, *, print_fn=print, target=None) -> dict:
    """Print and return the dry run's figures. ``target``: the pipeline plan and its microbatch count on per-layer
    costs compiled for it (a targets.Target: its compiler and chip, roofline seconds; "cpu": the host compiler's
    FLOPs, the microbatch count priced on microbatch_choice.MICROBATCH_CHIP's figures); None: the analytic costs."""
    given_microbatches, chip, planned = cfg.parallel.microbatches, pricing_chip(target), None
    if not gives_costs(target):
        # The deviceless GPU compiler has no cost analysis: the analytic per-layer costs, priced on the GPU's chip.
        print_fn(f"target {target.topology}: per-layer costs are the analytic model's (the GPU back end gives no cost "
                 f"analysis without a device); the microbatch count is priced on {chip.name}'s figures")
        target = None
    cfg = loop.for_devices(cfg, jax.device_count(), chip=chip)
    if given_microbatches == AUTO and target is not None and cfg.parallel.pipeline > 1:
        # On a target the printed recommendation comes from compiled costs: "auto" takes that count too (a run and
        # --compile_only fill it from the analytic costs, microbatch_choice.auto_microbatches).
        planned = microbatch_plan(cfg, chip=chip, target=target)
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, microbatches=planned.microbatches))
    if given_microbatches != cfg.parallel.microbatches:
        given_microbatches = f"{given_microbatches!r}, filled as {cfg.parallel.microbatches}"
    loop.validate(cfg, jax.device_count())
    mesh = loop.build_mesh(cfg.parallel)
    from mllm_jax.build import abstract_model

    abstract = abstract_model(cfg.model, mesh, cfg.parallel, cfg.train.seed)
    trainable = loop.trainable_filter(cfg.model)
    t_state = nnx.state(abstract, trainable)
    all_params = nnx.state(abstract, nnx.Param)
    n_train, n_all = _count(t_state), _count(all_params)
    params_b = _bytes(nnx.state(abstract))
    grads_b = _bytes(t_state)
    opt_b = 2 * sum(_per_device_bytes(x) / np.dtype(x.dtype).itemsize * 4 for x in jax.tree.leaves(t_state))
    act_b = activation_estimate(cfg)
    out = {
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "params_trainable": n_train,
        "params_frozen": n_all - n_train,
        "per_device_gib": {"params": params_b / GiB, "grads": grads_b / GiB, "adam_moments": opt_b / GiB,
                           "activations_rough": act_b / GiB, "total": (params_b + grads_b + opt_b + act_b) / GiB},
    }
    print_fn(f"mesh: {out['mesh']} over {out['devices']} device(s)")
    parts = [("llm", abstract.llm)]
    parts += [(f"encoders/{n}", abstract.encoders[n]) for n in sorted(cfg.model.encoders)]
    parts += [(f"projectors/{n}", abstract.projectors[n]) for n in sorted(cfg.model.projectors)]
    for key, module in parts:
        n = _count(nnx.state(module, nnx.Param))
        tag = "trainable" if cfg.model.is_trainable(key) else "frozen"
        print_fn(f"  {key:<20} {n:>16,} parameters ({tag})")
    print_fn(f"parameters: {n_train:,} trainable, {n_all - n_train:,} frozen, {n_all:,} total")
    g = out["per_device_gib"]
    print_fn("per-device memory estimate (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in g.items()))
    if cfg.parallel.pipeline > 1:
        out["pipeline_plan"] = pipeline_plan(cfg, target=target)
        from mllm_jax.parallel.pipeline_plan import format_microbatch_choices, format_plan

        print_fn(format_plan(out["pipeline_plan"]))
        if cfg.parallel.pipeline_stage_layers is not None:  # what runs: the given split, priced as "given"
            print_fn(f"LLM layers per stage as given (ParallelConfig.pipeline_stage_layers): "
                     f"{list(cfg.parallel.pipeline_stage_layers)}: the run's split, priced above as 'given'")
        out["microbatch_plan"] = planned or microbatch_plan(cfg, chip=chip, target=target)
        print_fn(f"microbatch count (ParallelConfig.microbatches is {given_microbatches}), planned on "
                 f"{chip.name}'s figures:")
        print_fn("\n".join(format_microbatch_choices(out["microbatch_plan"])))
    return out


def pipeline_plan(cfg: loop.RunConfig, target=None):
    """The frozen-aware planner's choice for the run's shapes: a microbatch of a data rank's rows, each row of
    DataConfig.seq_len tokens holding samples_per_row samples with their encoder instances; on the analytic costs,
    or (``target``: a targets.Target or "cpu") on per-layer costs compiled for it (train.layer_costs: the plan's
    ``cost_source`` says which; times in roofline seconds on a target's chip, FLOPs on "cpu")."""
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.pipeline_plan import plan_pipeline

    pc, dc = cfg.parallel, cfg.data
    rows = max(1, dc.batch_size // (pc.microbatches * pc.data * pc.fsdp))
    text, instances = row_shapes(cfg)
    costs = pipeline_costs(cfg.model, text_tokens=text, microbatch_size=rows, instances=instances)
    if target is None:
        return plan_pipeline(costs, pc)
    from mllm_jax.train.layer_costs import compiled_layer_costs

    table = compiled_layer_costs(cfg.model, text_tokens=text, microbatch_size=rows, target=target,
                                 instances=instances)
    return plan_pipeline(costs, pc, layer_costs=table, device_flops=1.0 if target == "cpu" else target.chip.peak_flops)
