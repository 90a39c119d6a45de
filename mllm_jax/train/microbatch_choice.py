"""The pipeline's microbatch count, chosen by the planner: ``ParallelConfig.microbatches = "auto"`` (resolved by
train.loop.for_devices, before anything is built) and --dry_run's recommendation.

A pipeline replica's rows (DataConfig.batch_size / (data x fsdp)) go in M microbatches, M among their divisors;
parallel.pipeline_plan.plan_microbatches simulates the schedule the runtime executes at every M (fill and drain
against each op's fixed cost and each tick's ppermute) under the chip's HBM and returns the fastest. Priced on a
chip's published figures (targets.CHIPS): the run's target, the accelerator this process runs on, or, on a CPU,
MICROBATCH_CHIP's (the CPU's own speed does not decide a layout meant for accelerators)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mllm_jax.data.train_data import uses_real_data
from mllm_jax.parallel.config import AUTO

if TYPE_CHECKING:
    from mllm_jax.train.loop import RunConfig

# The chip a CPU run (and --dry_run without an accelerator target) prices the microbatch count on.
MICROBATCH_CHIP = "v5p"


def auto_microbatches(cfg: RunConfig, chip=None) -> int:
    """The microbatch count ``ParallelConfig.microbatches = "auto"`` resolves to on a filled layout: 1 without a
    pipeline (more microbatches there only accumulate gradients: a memory choice, left to the user), else
    ``microbatch_plan``'s choice on ``chip`` (default ``pricing_chip()``)."""
    pc = cfg.parallel
    if pc.microbatches != AUTO:
        raise ValueError(f"auto_microbatches resolves ParallelConfig.microbatches={AUTO!r}; got {pc.microbatches!r}")
    if pc.pipeline == 1:
        return 1
    if uses_real_data(cfg.dataset):
        raise ValueError(f"ParallelConfig.microbatches={AUTO!r} plans the synthetic data's DataConfig.batch_size rows; "
                         f"a real dataset (DatasetConfig.path={cfg.dataset.path!r}) sets its own rows per microbatch "
                         f"(DatasetConfig.rows_per_microbatch): give ParallelConfig.microbatches as a number")
    return microbatch_plan(cfg, chip=chip or pricing_chip()).microbatches


def pricing_chip(target=None):
    """The chip the microbatch count is priced on: ``target``'s (a targets.Target), else this process's
    accelerator (targets.local_chip), else MICROBATCH_CHIP (a CPU run, or ``target`` "cpu")."""
    from mllm_jax.train.targets import CHIPS, local_chip

    if target not in (None, "cpu"):
        return target.chip
    return (local_chip() if target is None else None) or CHIPS[MICROBATCH_CHIP]


def row_shapes(cfg: RunConfig) -> tuple:
    """(text tokens, {encoder: instances}) of one row: samples_per_row samples with their encoder instances, in
    DataConfig.seq_len tokens of which the instances' injected features take their share."""
    from mllm_jax.costs import modality_shapes

    dc = cfg.data
    slots = {"vision": dc.max_images, "audio": dc.max_audio}
    instances = {n: dc.samples_per_row * slots.get(n, 1) for n in cfg.model.encoders} or None
    injected = sum(sh.injected for sh in modality_shapes(cfg.model, instances=instances).values())
    return max(dc.seq_len - injected, 1), instances


def microbatch_plan(cfg: RunConfig, chip=None, target=None):
    """The planner's microbatch count for the run's batch (``plan_microbatches``): a pipeline replica's rows
    (DataConfig.batch_size / (data x fsdp)) in M microbatches, M among their divisors (the counts the train step
    accepts), as a roofline of ``chip`` (targets.Chip; default the target's, else MICROBATCH_CHIP): FLOPs, the
    weights read again by every op, the per-tick ppermutes over one ICI link, the chip's HBM as the budget. Row
    costs: the analytic model's, or with ``target`` (a targets.Target or "cpu") compiled at microbatches of 1 and 2
    rows and fitted (train.layer_costs.compiled_row_costs)."""
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.pipeline_plan import analytic_row_costs, plan_microbatches
    from mllm_jax.train.targets import PPERMUTE_LATENCY_S

    chip = chip or pricing_chip(target)
    pc, dc = cfg.parallel, cfg.data
    rows = max(1, dc.batch_size // (pc.data * pc.fsdp))
    text, instances = row_shapes(cfg)

    def costs_at(r):
        return pipeline_costs(cfg.model, text_tokens=text, microbatch_size=r, instances=instances)

    if target is None:
        weight_bytes = 2.0 if cfg.model.dtype == "bfloat16" else 4.0
        row_costs = analytic_row_costs(costs_at(1), peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
                                       weight_bytes=weight_bytes)
    else:
        from mllm_jax.train.layer_costs import compiled_row_costs

        row_costs = compiled_row_costs(cfg.model, text_tokens=text, target=target, rows=(1, 2), instances=instances,
                                       chip=chip)
    return plan_microbatches(costs_at, pc, rows=rows, row_costs=row_costs, link_bandwidth=chip.link_bandwidth,
                             link_latency=PPERMUTE_LATENCY_S, memory_budget=chip.hbm_bytes, placement="outside")
