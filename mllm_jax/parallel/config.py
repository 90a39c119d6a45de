"""Parallel layout configs (gin-configurable through mllm_jax.gin_setup)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from mllm_jax.parallel.schedule import RUN_SCHEDULES, virtual_stages_of

# `expert`: expert parallelism (MoE experts split over it; the tokens too, like `data`, exchanged by all-to-all).
MESH_AXES = ("data", "fsdp", "expert", "pipeline", "context", "tensor")
# ParallelConfig.pipeline_encoders: where the encoders' forwards run around a pipeline.
PIPELINE_ENCODERS = ("auto", "outside", "bubbles")


class DeviceCountError(ValueError):
    """A layout whose mesh does not fit the devices there are (train.py adds how to get more on CPU)."""


# ContextConfig.block's value for a block chosen from the kernel tile and the sequence length.
AUTO = "auto"


@dataclass(frozen=True)
class ContextConfig:
    """Context parallelism: how tokens are distributed over the `context` axis and how K/V travel.

    ``block``: the planner's row block in tokens, or "auto": chosen per sequence length from the tile of the
    attention kernel the run's target runs (data.context_batches.context_block -> parallel.context.auto_block; the
    kernel's tile where S allows it without padding, smaller for short or ragged S)."""

    mode: str = "balanced"  # "uniform" | "zigzag" | "lpt" | "balanced"
    block: int | str = 128  # planner row block (tokens), or "auto"
    attention: str = "allgather"  # "allgather" | "ring"

    def __post_init__(self):
        b = self.block
        if b != AUTO and (isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1):
            raise ValueError(f"ContextConfig.block must be {AUTO!r} or a positive integer; got {b!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Mesh axis sizes (product = device count) and microbatching.

    ``rules`` optionally overrides the logical-axis -> mesh-axis table per module: {"llm": {"mlp": "tensor"},
    "encoders/vision": {...}}; see parallel.sharding for the defaults.
    """

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    pipeline: int = 1
    context: int = 1
    tensor: int = 1
    # A pipeline's microbatches (gradient accumulation without one); -1: one row per batch shard (parallel.fill);
    # "auto": the planner's count for the run's chip (train.microbatch_choice, resolved by train.loop.for_devices).
    microbatches: int | str = 1
    # The pipeline's schedule (parallel.schedule): "1f1b", "zb_h1" (weight gradients fill 1F1B's cool-down, same
    # activation memory), "1f1b_fb" (a forward and a backward paired per tick: the async 1F1B time in lockstep, about
    # twice 1F1B's activations), "1f1b_sliced" (1F1B's order cut into slices of layers, every tick about the same
    # cost: close to 1F1B-FB's time at 1F1B's activation memory; the planner chooses the slicing), "zb_v" (two
    # chunks per device as a V, weight gradients in the bubbles, 1F1B's
    # activation memory), "interleaved" (Megatron's virtual pipeline: more memory, shorter bubbles) or "auto" (the
    # planner's choice, by simulating each on the model's costs).
    pipeline_schedule: str = "1f1b"
    # Chunks per device under pipeline_schedule = "interleaved" (its virtual stages: pipeline x this many, each a
    # contiguous run of LLM layers; "zb_v" always runs two, as a V).
    pipeline_virtual_stages: int = 2
    # Under "zb_v": the microbatches admitted into the pipeline at once (None: min(pipeline, microbatches), 1F1B's
    # activation memory, or with pipeline_overlap_comm min(2 pipeline - 1, microbatches); fewer hold less and leave
    # more bubble).
    pipeline_in_flight: int | None = None
    # The pipeline's ppermutes beside the next tick's compute instead of after the tick (parallel.schedule: a message
    # to another device arrives one tick later, so the fill and drain take longer; the planner prices both with
    # the ppermute's time per tick).
    pipeline_overlap_comm: bool = False
    # With fsdp > 1: each pipeline stage casts its layer weights to the compute dtype and FSDP-gathers them once per
    # step, before the schedule's first tick, instead of gathering each layer (as stored, float32) for every
    # forward, recompute and backward of every microbatch. Costs the stage's gathered weights in the compute dtype,
    # held for the whole step (docs/pipeline.md, "Memory").
    pipeline_fsdp_gather_once: bool = False
    # LLM layers per pipeline stage, in the model's order (under "interleaved" / "zb_v" per virtual stage: pipeline x
    # chunks entries), e.g. (9, 8, 8, 7); None: the frozen-aware planner's split (docs/pipeline.md).
    pipeline_stage_layers: tuple | None = None
    # Where the encoders' forwards run (docs/pipeline.md, "Encoders in the bubbles"): "outside" (before the
    # pipeline, spread over every device), "bubbles" (frozen encoders: each microbatch whose encode fits into an
    # idle warm-up tick of the device that stores its input runs there, inside the pipeline; the rest outside) or
    # "auto" (bubbles where the model's encoders are all frozen and some encode fits, else outside).
    pipeline_encoders: str = "auto"
    context_config: ContextConfig = field(default_factory=ContextConfig)
    rules: dict = field(default_factory=dict)

    def __post_init__(self):
        mb = self.microbatches
        if mb != AUTO and (isinstance(mb, bool) or not isinstance(mb, numbers.Integral)):
            raise ValueError(f"ParallelConfig.microbatches must be an integer or {AUTO!r}; got {mb!r}")
        if self.pipeline_schedule not in ("auto",) + RUN_SCHEDULES:
            raise ValueError(f"ParallelConfig.pipeline_schedule must be 'auto' or one of {RUN_SCHEDULES}; got "
                             f"{self.pipeline_schedule!r}")
        v = self.pipeline_virtual_stages
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 2:
            raise ValueError(f"ParallelConfig.pipeline_virtual_stages must be an integer >= 2 (chunks per device "
                             f"under 'interleaved'); got {v!r}")
        n = self.pipeline_in_flight
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"ParallelConfig.pipeline_in_flight must be None or an integer >= 1; got {n!r}")
        if not isinstance(self.pipeline_overlap_comm, bool):
            raise ValueError(f"ParallelConfig.pipeline_overlap_comm must be True or False; got "
                             f"{self.pipeline_overlap_comm!r}")
        sl = self.pipeline_stage_layers
        if sl is not None:
            if not isinstance(sl, (tuple, list)) or not sl or any(
                    isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in sl):
                raise ValueError(f"ParallelConfig.pipeline_stage_layers must be None or a tuple of layer counts >= 1 "
                                 f"(one per stage); got {sl!r}")
            object.__setattr__(self, "pipeline_stage_layers", tuple(int(c) for c in sl))
        if self.pipeline_encoders not in PIPELINE_ENCODERS:
            raise ValueError(f"ParallelConfig.pipeline_encoders must be one of {PIPELINE_ENCODERS}; got "
                             f"{self.pipeline_encoders!r}")
        if not isinstance(self.pipeline_fsdp_gather_once, bool):
            raise ValueError(f"ParallelConfig.pipeline_fsdp_gather_once must be True or False; got "
                             f"{self.pipeline_fsdp_gather_once!r}")

    def chunks_per_device(self, schedule: str | None = None) -> int:
        """Chunks of LLM layers each pipeline device runs under ``schedule`` (default ``pipeline_schedule``): 1, two
        as zb_v's V, or ``pipeline_virtual_stages`` under "interleaved"."""
        schedule = self.pipeline_schedule if schedule is None else schedule
        return virtual_stages_of(schedule, self.pipeline_virtual_stages if schedule == "interleaved" else None)

    @property
    def axis_sizes(self) -> dict:
        return {a: getattr(self, a) for a in MESH_AXES}

    @property
    def num_devices(self) -> int:
        n = 1
        for a in MESH_AXES:
            n *= getattr(self, a)
        return n


def check_stage_layers(pc: ParallelConfig, n_layers: int, schedule: str | None = None) -> None:
    """``pc.pipeline_stage_layers`` against the LLM's ``n_layers`` and the schedule that counts its stages (default
    ``pc.pipeline_schedule``): one entry per (virtual) stage, summing to the layers; refused naming the values."""
    got = pc.pipeline_stage_layers
    schedule = pc.pipeline_schedule if schedule is None else schedule
    if pc.pipeline == 1:
        raise ValueError(f"ParallelConfig.pipeline_stage_layers={got} is set but ParallelConfig.pipeline is 1")
    if schedule == "auto":
        raise ValueError(f"ParallelConfig.pipeline_stage_layers={got} needs a schedule to count its stages; "
                         f"ParallelConfig.pipeline_schedule is 'auto' (name one, e.g. '1f1b')")
    chunks = pc.chunks_per_device(schedule)
    want = pc.pipeline * chunks
    if len(got) != want or sum(got) != n_layers:
        what = f"{want} entries" + (f" (ParallelConfig.pipeline={pc.pipeline} x {chunks} chunks under "
                                    f"{schedule!r})" if chunks > 1 else " (one per pipeline stage)")
        raise ValueError(f"ParallelConfig.pipeline_stage_layers={got} must have {what} summing to LLMConfig.n_layers="
                         f"{n_layers}")
