"""The pipelined train step: the 1F1B pipeline runtime (parallel.pipeline) wired to the real MultimodalModel.

What runs where (DESIGN.md, "The data flow of one training step"):
- outside the pipeline: encoders, projectors, placeholder injection and the token embedding, over all microbatches
  at once (the encoders' batch spread over every mesh axis by their rules; the embedding and injection on rows laid
  out as the pipeline stores its inputs, ``MicrobatchRows``: each device embeds only the microbatches and rows it
  holds). Differentiated by one ``jax.vjp`` when anything in them trains; frozen encoders already run under
  ``stop_gradient`` in the model.
- inside the pipeline (``pipeline_value_and_grad``): the LLM's stacked decoder layers (``LLM.stage_layer``), one
  microbatch at a time; the last stage's loss function is ``llm.head_loss`` (final norm + chunked cross entropy),
  divided by the global label count (computed outside, so the loss and gradients equal the one-device
  ``loss_sum / count``).
- the input cotangent that the pipeline hands back (stage 0; stored where its input was) is pulled through the
  embedding vjp in the same layout.
- encoders in the bubbles (``ParallelConfig.pipeline_encoders``, ``_embed_around``): frozen encoders' forwards of
  the microbatches whose encode fits into an idle warm-up tick of the device that stores their input run there,
  inside the pipeline (``parallel.bubble_encode``, ``parallel.pipeline.Prepare``); the embedding's vjp then runs
  after the pipeline, on the features as they ended up.

Gradients come back as an ``nnx.State`` of exactly the parameters ``mllm_jax.freeze.trainable_filter`` selects.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import costs
from mllm_jax import layers as L
from mllm_jax import lora as lora_lib
from mllm_jax import moe as moe_lib
from mllm_jax import partitioning as part
from mllm_jax.freeze import trainable_filter
from mllm_jax.kernels.meta import TokenMeta
from mllm_jax.layout import validate_layout
from mllm_jax.llm import check_rope_positions, head_loss
from mllm_jax.loss import IGNORE
from mllm_jax.multimodal import ENCODER_KEYS, encoder_is_frozen, inject, llm_meta, num_features
from mllm_jax.parallel.bubble_encode import EncodePlan
from mllm_jax.parallel.conveyor import slots_per_device
from mllm_jax.parallel.pipeline import Prepare, pipeline_value_and_grad, runtime_tables
from mllm_jax.parallel.pipeline_plan import bubble_choice, plan_pipeline
from mllm_jax.parallel.schedule import VIRTUAL_SCHEDULES

PIPELINE = "pipeline"
TOKEN_KEYS = ("input_ids", "labels", "positions", "segment_ids", "span_ids")
META_KEYS = ("positions", "segment_ids", "span_ids")


# ---------------------------------------------------------------------------------------------------------------
# Which parts train.


def llm_layers_trainable(config) -> bool:
    """Something inside the decoder layers trains (the whole LLM, or its LoRA adapters)."""
    return config.is_trainable("llm") or lora_lib.lora_for(config, "llm") is not None


def llm_base_trainable(config) -> bool:
    """The LLM's own weights (embedding, final norm, head, base layer weights) train: trainable and not LoRA'd."""
    return config.is_trainable("llm") and lora_lib.lora_for(config, "llm") is None


def embedding_requires_grad(config, modalities) -> bool:
    """The pipeline input (injected embeddings) depends on a trainable parameter: the token embedding, a
    projector, or an encoder (weights or adapters) of a modality present in the batch."""
    if llm_base_trainable(config):
        return True
    for name in modalities:
        if not encoder_is_frozen(config, name) or config.is_trainable(f"projectors/{name}"):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# Stage layer counts.


def planned_runtime(config, parallel_config, *, text_tokens: int, microbatch_size: int = 1, instances=None,
                    memory_budget: float = float("inf")):
    """The frozen-aware planner's placement for this runtime (``PipelinePlan.runtime``): encoders outside the pipeline
    (the only placement this runtime runs), the LLM split with the least simulated step time of the runtime's
    lockstep ticks under ``parallel_config.pipeline_schedule`` ("auto": the faster schedule, in ``.schedule``)."""
    plan = plan_pipeline(costs.pipeline_costs(config, text_tokens=text_tokens, microbatch_size=microbatch_size,
                                              instances=instances),
                         parallel_config, memory_budget=memory_budget, placement="outside",
                         schedule=parallel_config.pipeline_schedule)
    return plan.runtime


def plan_stage_layers(config, parallel_config, **kw) -> tuple:
    """LLM layers per pipeline stage of ``planned_runtime``."""
    return tuple(int(c) for c in planned_runtime(config, parallel_config, **kw).llm_stage_layers)


# ---------------------------------------------------------------------------------------------------------------
# Microbatches <-> one flat batch for the encoders. Rows are flattened microbatch-minor ([mb, M] -> mb * M) so a
# batch dimension sharded over `data` stays the major, sharded dimension through the reshapes.


def check_microbatched(batch: dict, microbatches: int) -> tuple:
    """(M, rows per microbatch, sequence length) of a batch whose leaves carry a leading microbatch axis."""
    ids = batch["input_ids"]
    if ids.ndim != 3:
        raise ValueError(f"input_ids must be [microbatches, batch, seq] with a leading microbatch axis; got shape "
                         f"{tuple(ids.shape)}")
    if ids.shape[0] != microbatches:
        raise ValueError(f"the batch has {ids.shape[0]} microbatches (leading axis of input_ids) but "
                         f"ParallelConfig.microbatches is {microbatches}")
    for k in TOKEN_KEYS[1:]:
        if tuple(batch[k].shape) != tuple(ids.shape):
            raise ValueError(f"{k} shape {tuple(batch[k].shape)} must equal input_ids shape {tuple(ids.shape)}")
    rope = batch.get("rope_positions")
    if rope is not None and tuple(rope.shape) != tuple(ids.shape) + (3,):
        raise ValueError(f"rope_positions shape {tuple(rope.shape)} must be input_ids shape + (3,) = "
                         f"{tuple(ids.shape) + (3,)}")
    for key in ENCODER_KEYS:
        for name, x in (batch.get(key) or {}).items():
            for a in jax.tree.leaves(x):  # one array, or a native-resolution modality's dict of patch rows
                if a.shape[0] != microbatches:
                    raise ValueError(f"{key}[{name!r}] has {a.shape[0]} microbatches (leading axis); expected "
                                     f"{microbatches}")
    return tuple(int(d) for d in ids.shape)


def _rows_flat(a, fill: int = 0):
    """[M, mb, ...] -> [mb * M, ...] (row r = b * M + m). (``fill``: for ``MicrobatchRows.to_rows``' signature.)"""
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape((-1,) + a.shape[2:])


def flatten_microbatches(batch: dict, features_per_instance: dict, rows=_rows_flat) -> dict:
    """One contract batch holding every microbatch: token arrays [mb * M, S], encoder inputs [N * M, ...] and
    feature indices pointing at the flattened features (instance n of microbatch m is row n * M + m). ``rows``: how
    the token arrays' [M, mb, ...] become rows (``_rows_flat``, or ``MicrobatchRows.to_rows``, which may pad M)."""
    M = batch["input_ids"].shape[0]
    flat = {k: rows(batch[k]) for k in TOKEN_KEYS if k in batch}
    inputs = {}
    for key in ENCODER_KEYS:  # pixels/frames, or a frozen encoder's cached features
        if batch.get(key):
            # A native-resolution modality's input is a dict of packed patch rows, each array row-major.
            flat[key] = {name: jax.tree.map(_rows_flat, x) for name, x in batch[key].items()}
            inputs.update(batch[key])
    if inputs:
        index = {}
        for name in inputs:
            t = features_per_instance[name]
            fi = jnp.asarray(batch["feature_index"][name], jnp.int32)  # [M, mb, S]: n * t + j within microbatch m
            m = jnp.arange(M, dtype=jnp.int32)[:, None, None]
            moved = ((fi // t) * M + m) * t + fi % t
            index[name] = rows(jnp.where(fi >= 0, moved, -1), fill=-1)
        flat["feature_index"] = index
    return flat


@dataclasses.dataclass(frozen=True)
class MicrobatchRows:
    """The pipeline's inputs made where they are used. The pipeline stores microbatch m = p K + j on device p of
    `pipeline` (``parallel.conveyor``: K = ``slots_per_device(M, P)`` slots per device, zeros past M), each
    microbatch's rows split over the LLM's batch axes (``axes``, D shards). The embedding runs on flat rows laid out
    over (`pipeline`, *axes) in the order [P, D, K, mb / D] (``to_rows``), so each device embeds exactly the rows
    it will hold, and the inverse (``to_microbatches``) is a local reshape: no device makes another's inputs, and
    the input gradient goes back into the embedding's vjp the same way."""

    mesh: object
    microbatches: int  # M
    per_device: int  # K
    axes: tuple  # the LLM's batch axes that split a microbatch's rows
    length: object  # the sequence dimension's mesh axes (context parallelism), or None

    @property
    def stages(self) -> int:
        return self.mesh.shape[PIPELINE]

    @property
    def shards(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.axes], dtype=np.int64))

    @property
    def padded(self) -> int:
        """P x K: the pipeline's rows of microbatch inputs."""
        return self.stages * self.per_device

    def _sharding(self, rank: int, dims: dict):
        return NamedSharding(self.mesh, P(*(dims.get(i) for i in range(rank))))

    def to_rows(self, a, fill: int = 0):
        """[M (or P K), mb, S, ...] -> [P D K (mb / D), S, ...], laid out over (`pipeline`, *axes); the conveyor's
        microbatches past M are ``fill`` (token ids 0, feature indices -1: no features)."""
        a = jnp.asarray(a)
        if a.shape[0] < self.padded:
            a = jnp.pad(a, [(0, self.padded - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        P_, K, D = self.stages, self.per_device, self.shards
        mb, rest = a.shape[1], a.shape[2:]
        batch = self.axes or None
        a = jax.sharding.reshard(a, self._sharding(a.ndim, {0: PIPELINE, 1: batch, 2: self.length}))
        a = jnp.reshape(a, (P_, K, D, mb // D) + rest,
                        out_sharding=self._sharding(4 + len(rest), {0: PIPELINE, 2: batch, 4: self.length}))
        a = jnp.swapaxes(a, 1, 2)
        return jnp.reshape(a, (P_ * D * K * (mb // D),) + rest,
                           out_sharding=self._sharding(1 + len(rest), {0: (PIPELINE, *self.axes), 1: self.length}))

    def to_microbatches(self, a):
        """Inverse of ``to_rows``: [P D K (mb / D), S, ...] -> [P K, mb, S, ...], microbatches over `pipeline` and
        rows over the batch axes (no data moves)."""
        P_, K, D = self.stages, self.per_device, self.shards
        mb, rest = a.shape[0] // self.padded, a.shape[1:]
        batch = self.axes or None
        a = jax.sharding.reshard(a, self._sharding(a.ndim, {0: (PIPELINE, *self.axes), 1: self.length}))
        a = jnp.reshape(a, (P_, D, K, mb // D) + rest,
                        out_sharding=self._sharding(4 + len(rest), {0: PIPELINE, 1: batch, 4: self.length}))
        a = jnp.swapaxes(a, 1, 2)
        return jnp.reshape(a, (P_ * K, mb) + rest,
                           out_sharding=self._sharding(2 + len(rest), {0: PIPELINE, 1: batch, 2: self.length}))


def microbatch_rows(model, mesh, microbatches: int, mb: int, seq: int) -> MicrobatchRows:
    """The layout of the pipeline's inputs for this mesh: the LLM's batch axes that divide a microbatch's ``mb``
    rows, and its sequence axes."""
    with model.scope("llm"):
        spec = part.spec(("batch", "length"), (mb, seq))
    axes, length = (None, None) if spec is None else tuple(spec)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return MicrobatchRows(mesh, int(microbatches), slots_per_device(microbatches, mesh.shape[PIPELINE]), axes,
                          length)


# ---------------------------------------------------------------------------------------------------------------
# The LLM's own layer and loss, in the runtime's signatures (per-microbatch aux instead of TokenMeta).


def _stage_layer(llm):
    layer, window_codes = llm.stage_layer()

    def layer_fn(p, h, aux_m):
        return layer(p, h, TokenMeta(*(aux_m[k] for k in META_KEYS)), moe_weight=aux_m.get("moe_weight"),
                     rope_positions=aux_m.get("rope_positions"))

    return layer_fn, window_codes


def _gather_stage_once(llm):
    """The stage's stacked layer weights as its layers use them, made once per step (``ParallelConfig.
    pipeline_fsdp_gather_once``): cast to the compute dtype first, then FSDP-gathered (the all-gather moves the
    compute dtype's bytes), each leaf laid out as ``llm.use_layer_params`` lays out one layer (tensor and expert
    splits kept), so the layer's own gather and cast find nothing left to do. The leading slot axis is named
    ``layers``, which maps to the Manual `pipeline` axis inside the pipeline: it stays whole."""
    _, names = llm.layer_params()
    dtype = L.dtype_of(llm.run.dtype)

    def gather(p_L: dict) -> dict:
        w = jax.tree.map(lambda a: a.astype(dtype), p_L["weights"])
        out = L.use_params({k: v for k, v in w.items() if k != "moe"}, {k: names[k] for k in w if k != "moe"}, dtype)
        if "moe" in w:
            out["moe"] = moe_lib.use_moe_params(w["moe"], names["moe"], dtype, drop_leading=False)
        return {**p_L, "weights": out}

    return gather


def _loss_fn(llm, chunk):
    def loss_fn(head_params, y, aux_m):
        total, _ = head_loss(head_params, y, aux_m["labels"], llm.config, chunk=chunk)
        return total * aux_m["inv_count"]

    return loss_fn


def _add_into(dst: dict, src: dict) -> None:
    """dst[k] += src[k] for the keys dst has (dst holds only trainable leaves), in dst's sharding."""
    for k, v in src.items():
        if k not in dst:
            continue
        if isinstance(dst[k], dict):
            _add_into(dst[k], v)
            continue
        want = getattr(jax.typeof(dst[k]), "sharding", None)
        v = v.astype(dst[k].dtype)
        if want is not None and getattr(jax.typeof(v), "sharding", None) != want and want.mesh.axis_names:
            v = jax.sharding.reshard(v, want)
        dst[k] = dst[k] + v


# ---------------------------------------------------------------------------------------------------------------
# The entry point for the train step.


def pipelined_loss_and_grad(model, batch: dict, *, mesh, parallel_config, stage_layers=None, chunk=None,
                            schedule: str | None = None):
    """Loss and gradients of ``model`` (a MultimodalModel) on a microbatched batch, the LLM pipelined over the
    mesh's `pipeline` axis. Call inside jit under ``jax.set_mesh(mesh)``.

    batch: the contract batch with a leading microbatch axis on every leaf ([M, mb, S] token arrays, [M, N, ...]
    encoder inputs, [M, mb, S] feature indices into each microbatch's own features), M =
    ``parallel_config.microbatches``: the same batch the train step scans over.
    stage_layers: LLM layers per stage (uneven allowed; per virtual stage, pipeline x chunks entries in the model's
    order, under "interleaved" / "zb_v"); None: ``parallel_config.pipeline_stage_layers``, else the frozen-aware
    planner's (encoders outside).
    schedule: one of ``parallel.schedule.SCHEDULES`` or "auto" (the planner's); None:
    ``parallel_config.pipeline_schedule``; "interleaved" runs ``parallel_config.pipeline_virtual_stages`` chunks per
    device.
    ``parallel_config.pipeline_fsdp_gather_once`` (with a mesh fsdp axis > 1): each stage casts its layer weights to
    the compute dtype and FSDP-gathers them once per step, before its first tick (docs/pipeline.md).

    Returns (loss_sum, label_count, grads): the global sum of token losses and the global count of label tokens
    (float32 scalars), and the gradient of loss_sum / label_count as an nnx.State over exactly
    ``nnx.split(model, trainable_filter(model.config), ...)[1]``: ready for ``optimizer.update``.
    """
    config = model.config
    M, mb, seq = _check_call(model, batch, mesh, parallel_config)
    if stage_layers is None:
        stage_layers = parallel_config.pipeline_stage_layers
    stage_layers, schedule, slicing = _stage_layers(config, parallel_config, batch, stage_layers,
                                                    stages=mesh.shape["pipeline"], mb=mb, seq=seq,
                                                    schedule=schedule or parallel_config.pipeline_schedule)
    labels = jnp.asarray(batch["labels"], jnp.int32)
    count = jnp.sum((labels != IGNORE).astype(jnp.float32))
    inv_count = 1.0 / jnp.maximum(count, 1.0)
    rows = microbatch_rows(model, mesh, M, mb, seq)
    V = parallel_config.chunks_per_device(schedule)
    in_flight = parallel_config.pipeline_in_flight if schedule == "zb_v" else None
    plan = _encode_plan(model, batch, parallel_config, stage_layers=stage_layers, schedule=schedule, slicing=slicing,
                        in_flight=in_flight, mb=mb, seq=seq)
    outside = _embed_outside(model, batch, rows) if plan is None else _embed_around(model, batch, rows, plan)
    gather_once = parallel_config.pipeline_fsdp_gather_once and dict(mesh.shape).get("fsdp", 1) > 1
    loss, g_layers, g_loss_params, dx_M, made = _pipeline(model, batch, outside, labels, inv_count, mesh=mesh,
                                                          stage_layers=stage_layers, chunk=chunk, schedule=schedule,
                                                          gather_once=gather_once, virtual_stages=V,
                                                          in_flight=in_flight,
                                                          overlap=parallel_config.pipeline_overlap_comm,
                                                          slicing=slicing)
    if outside.late_vjp is not None:  # encoders in the bubbles: the embedding's vjp on the features made inside
        outside = outside.late_vjp(made)
    grads = _gather_grads(outside, g_layers, g_loss_params, dx_M)
    return loss * count, count, grads


def _check_call(model, batch: dict, mesh, parallel_config) -> tuple:
    """(M, rows per microbatch, sequence length), after checking the mesh, the layout and the batch: the pipeline
    axis matches ParallelConfig.pipeline, the layout is valid, every leaf carries the leading microbatch axis."""
    S = mesh.shape["pipeline"]
    if parallel_config.pipeline != S:
        raise ValueError(f"ParallelConfig.pipeline is {parallel_config.pipeline} but the mesh's pipeline axis has "
                         f"{S} devices")
    validate_layout(parallel_config, model.config)
    return check_microbatched(batch, parallel_config.microbatches)


def _stage_layers(config, parallel_config, batch: dict, stage_layers, *, stages: int, mb: int, seq: int,
                  schedule: str) -> tuple:
    """(LLM layers per stage, schedule, slicing): as given, or the frozen-aware planner's for this batch's shapes
    (the layers when none are given, the schedule when it is "auto"); the layers checked to have one entry per stage
    and to sum to the LLM's layer count. Under "1f1b_sliced" the slicing is the planner's for those layers (it
    prices the tables of its budgets with the model's costs), so the runtime runs the table the planner chose."""
    n_layers = config.llm.n_layers
    planned, slicing = None, None

    def plan(pc):
        return planned_runtime(config, pc, text_tokens=seq, microbatch_size=mb,
                               instances=_instances(batch, mb) or None)

    if stage_layers is None or schedule == "auto":
        planned = plan(dataclasses.replace(parallel_config, pipeline_schedule=schedule))
        stage_layers = planned.llm_stage_layers if stage_layers is None else stage_layers
        schedule = planned.schedule if schedule == "auto" else schedule
    stage_layers = tuple(int(c) for c in stage_layers)
    V = parallel_config.chunks_per_device(schedule)
    if len(stage_layers) != stages * V or sum(stage_layers) != n_layers:
        what = f"{stages} entries (pipeline stages)" if V == 1 else (f"{stages * V} entries ({stages} pipeline "
                                                                   f"stages x {V} chunks under {schedule!r})")
        raise ValueError(f"stage_layers {stage_layers} must have {what} summing to the LLM's n_layers ({n_layers})")
    if schedule == "1f1b_sliced":
        if planned is None or planned.schedule != schedule or tuple(planned.llm_stage_layers) != stage_layers:
            planned = plan(dataclasses.replace(parallel_config, pipeline_schedule=schedule,
                                               pipeline_stage_layers=stage_layers))
        slicing = planned.slicing
    return stage_layers, schedule, slicing


def _instances(batch: dict, mb: int) -> dict:
    """Encoder instances per row of each modality's microbatches (at least one), as the cost model counts them."""
    inputs = batch.get("encoder_inputs") or {}
    return {k: max(1, jax.tree.leaves(x)[0].shape[1] // mb) for k, x in inputs.items()}


class _Outside(NamedTuple):
    """What runs outside the pipeline: the injected embeddings (flat rows, and [P K, mb, S, D] for the pipeline: its
    ``rows`` layout), the trainable state they were differentiated against, and their vjp (None when nothing upstream
    trains). With encoders in the bubbles (``_embed_around``): the pipeline's ``prepare`` and ``late_vjp(made)``,
    which takes what the encodes made and returns the _Outside whose ``embed_vjp`` the gradients go through."""

    emb: jax.Array
    x_M: jax.Array
    rows: MicrobatchRows
    trainable: nnx.State
    embed_vjp: Callable | None
    prepare: Prepare | None = None
    late_vjp: Callable | None = None
    needs_grad: bool = False  # the pipeline input depends on a trainable parameter


def _with_batch_axes(rule_table, axes: tuple):
    """The model's rule table with the LLM's "batch" mapped to ``axes`` (a model without rules: that one rule)."""
    if rule_table is None:
        return (("llm", (("batch", axes),)),)
    return tuple((key, tuple((n, axes if n == "batch" else v) for n, v in rules) if key == "llm" else rules)
                 for key, rules in rule_table)


def _embedder(model, batch: dict, rows: MicrobatchRows) -> tuple:
    """(embed(trainable state) -> the injected embeddings of every microbatch as flat rows in ``rows``' layout, the
    model's trainable state, the batch's modalities): ``model.embed`` of the flattened batch, differentiable in the
    trainable state."""
    config = model.config
    modalities = sorted({name for key in ENCODER_KEYS for name in (batch.get(key) or {})})
    flat = flatten_microbatches(batch, {name: num_features(config, name) for name in modalities}, rows=rows.to_rows)
    rule_table = _with_batch_axes(model.rule_table, (PIPELINE, *rows.axes))
    gdef, trainable, frozen, rest = nnx.split(model, trainable_filter(config), nnx.Param, ...)

    def embed(tr):
        m = nnx.merge(gdef, tr, frozen, rest)
        m.rule_table = rule_table  # the LLM's rows over (`pipeline`, its batch axes): rows.to_rows' layout
        return m.embed(flat)

    return embed, trainable, modalities


def _embed_outside(model, batch: dict, rows: MicrobatchRows) -> _Outside:
    """Encoders, projectors, injection and the token embedding over all microbatches at once, differentiated by one
    vjp when anything in them trains (``embedding_requires_grad``). The token embedding and the injection run on
    ``rows``' layout, so each device makes the inputs of its own microbatches' rows only."""
    embed, trainable, modalities = _embedder(model, batch, rows)
    embed_vjp = None
    needs_grad = embedding_requires_grad(model.config, modalities)
    if needs_grad:
        emb, embed_vjp = jax.vjp(embed, trainable)
    else:
        emb = embed(trainable)
    return _Outside(emb, rows.to_microbatches(emb), rows, trainable, embed_vjp, needs_grad=needs_grad)


# ---------------------------------------------------------------------------------------------------------------
# Encoders in the bubbles (parallel.bubble_encode; ParallelConfig.pipeline_encoders).


def bubble_modalities(config, batch: dict) -> tuple:
    """The modalities whose encoders may run inside the pipeline for this batch, or () with the reason why none
    may as the second entry: every encoder present is frozen (its forward only) and gets dense inputs
    (``encoder_inputs``, not a native-resolution modality's packed rows, not cached features)."""
    inputs = batch.get("encoder_inputs") or {}
    if not inputs:
        return (), "the batch has no encoder_inputs"
    if batch.get("encoder_features"):
        return (), "the batch also carries cached encoder_features"
    thawed = sorted(n for n in inputs if not encoder_is_frozen(config, n))
    if thawed:
        return (), f"the encoders of {thawed} train (only a frozen encoder's forward can run in a bubble)"
    packed = sorted(n for n, x in inputs.items() if isinstance(x, dict))
    if packed:
        return (), f"{packed} have native-resolution (packed) inputs"
    return tuple(sorted(inputs)), ""


def _encode_plan(model, batch: dict, parallel_config, *, stage_layers, schedule: str, slicing, in_flight, mb: int,
                 seq: int) -> EncodePlan | None:
    """Which microbatches' encoders run in the pipeline's idle ticks (``ParallelConfig.pipeline_encoders``), on the
    table the runtime will execute, priced by the planner's costs of this batch's shapes; None: all outside."""
    config, want = model.config, parallel_config.pipeline_encoders
    if want == "outside":
        return None
    names, why = bubble_modalities(config, batch)
    if not why and schedule in VIRTUAL_SCHEDULES:
        why = f"schedule {schedule!r} runs chunks of layers on every device (bubbles are planned for one chunk)"
    if why:
        if want == "bubbles":
            raise ValueError(f"ParallelConfig.pipeline_encoders='bubbles' cannot run here: {why}")
        return None
    M = parallel_config.microbatches
    pc = costs.pipeline_costs(config, text_tokens=seq, microbatch_size=mb, instances=_instances(batch, mb))
    n_layers = config.llm.n_layers
    tables = runtime_tables(stage_layers, M, trainable_layers=np.full(n_layers, llm_layers_trainable(config)),
                            input_requires_grad=embedding_requires_grad(config, names),
                            loss_params_trainable=llm_base_trainable(config), schedule=schedule,
                            max_in_flight=in_flight, overlap=parallel_config.pipeline_overlap_comm, slicing=slicing)
    choice = bubble_choice(pc, stage_layers, tables.schedule, M, parallel_config.pipeline)
    # The planner's rule (``BubbleChoice.used``) on the step with every encoder outside.
    return choice.plan if choice.used(want, choice.table_time + choice.time_outside) else None


def _pad_rows(a, rows: int, fill=0):
    a = jnp.asarray(a)
    return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=fill)


def _encode_in_loop(model, names: tuple):
    """(fn, params) of ``Prepare``: one microbatch's frozen encoders, projectors and injection into its stored
    token embeddings; ``fn`` returns the encoders' (pre-projector) features too, for the vjp after the pipeline."""
    parts = {name: (nnx.split(model.encoders[name]), nnx.split(model.projectors[name])) for name in names}
    graphs = {name: (e[0], p[0]) for name, (e, p) in parts.items()}
    params = {name: (e[1], p[1]) for name, (e, p) in parts.items()}

    def fn(params, inputs_j, x_j):
        made = {}
        for name in names:
            (g_enc, g_proj), (s_enc, s_proj) = graphs[name], params[name]
            with model.scope(f"encoders/{name}"):
                f = jax.lax.stop_gradient(nnx.merge(g_enc, s_enc)(inputs_j["pixels"][name]))
            with model.scope(f"projectors/{name}"):
                p = nnx.merge(g_proj, s_proj)(f)
            n, t, d = p.shape
            # One microbatch's features, whole on each device of the stage for the gather into its rows (gathering
            # from features sharded over fsdp inside the pipeline's manual region crashes XLA's SPMD partitioner).
            p = jax.sharding.reshard(p.reshape(n * t, d).astype(x_j.dtype), P())
            with model.scope("llm"):
                x_j = inject(x_j, p, inputs_j["index"][name])
            made[name] = f
        return x_j, made

    return fn, params


def _embed_around(model, batch: dict, rows: MicrobatchRows, plan: EncodePlan) -> _Outside:
    """The pipeline's inputs with some microbatches' encoders in its bubbles (``plan``). Before it: the other
    microbatches' encoders (over every device, as ``_embed_outside`` runs them) and everyone's token embeddings and
    injection, the in-pipeline microbatches' features zeros for now; inside it: their encoders, projectors and
    injection into their stored inputs (``_encode_in_loop``); after it (``late_vjp``): when anything upstream trains,
    the vjp of the embedding of the features as they ended up (the in-pipeline ones from the pipeline), the same
    function of the same features as the one-device step differentiates."""
    config = model.config
    names, _ = bubble_modalities(config, batch)
    M = rows.microbatches
    inside = np.isin(np.arange(M), plan.microbatches)
    out_idx = np.flatnonzero(~inside)
    features = {}
    for name in names:
        pix_M = batch["encoder_inputs"][name]  # [M, N, ...]
        N = pix_M.shape[1]
        one = jax.eval_shape(lambda x: model.encoder_features(name, x),  # noqa: B023
                             jax.ShapeDtypeStruct(pix_M.shape[1:], pix_M.dtype))  # [N, T, D_enc]
        f_M = jnp.zeros((M,) + tuple(one.shape), one.dtype)
        if out_idx.size:  # the rest encoded before the pipeline, instance-major as the flat batch orders them
            pix = _rows_flat(jnp.asarray(pix_M)[out_idx])
            f = model.encoder_features(name, pix)  # [N x M_out, T, D_enc]
            f = jax.sharding.reshard(f, NamedSharding(rows.mesh, P()))  # whole, to place among all M
            f = jnp.swapaxes(f.reshape((N, out_idx.size) + f.shape[1:]), 0, 1)
            f_M = f_M.at[out_idx].set(f.astype(f_M.dtype))
        features[name] = f_M
    needs_grad = embedding_requires_grad(config, names)

    def embed_with(feats_M):  # the embedding of the batch with these (pre-projector) features as cached ones
        given = {k: v for k, v in batch.items() if k != "encoder_inputs"}
        return _embedder(model, {**given, "encoder_features": feats_M}, rows)[:2]

    embed, trainable = embed_with(features)
    emb = embed(trainable)
    x_M = rows.to_microbatches(emb)
    fn, params = _encode_in_loop(model, names)
    P_K = rows.padded
    inputs = {"pixels": {n: _pad_rows(batch["encoder_inputs"][n], P_K) for n in names},
              "index": {n: rows.to_microbatches(rows.to_rows(batch["feature_index"][n], fill=-1)) for n in names}}
    prepare = Prepare(fn, params, inputs, plan)

    def late_vjp(made) -> _Outside:
        if not needs_grad:
            return _Outside(emb, x_M, rows, trainable, None, needs_grad=False)
        mask = jnp.asarray(inside)
        whole = NamedSharding(rows.mesh, P())  # the P K rows made over `pipeline`, whole here to take the first M

        def ended(n):
            mine = jax.sharding.reshard(made[n], whole)[:M].astype(features[n].dtype)
            return jnp.where(mask.reshape((M,) + (1,) * (mine.ndim - 1)), mine, features[n])

        feats = {n: ended(n) for n in names}
        late_embed, tr = embed_with(feats)
        emb2, vjp = jax.vjp(late_embed, tr)
        return _Outside(emb2, x_M, rows, tr, vjp, needs_grad=True)

    return _Outside(emb, x_M, rows, trainable, None, prepare, late_vjp, needs_grad)



def _pipeline(model, batch: dict, outside: _Outside, labels, inv_count, *, mesh, stage_layers: tuple, chunk,
              schedule: str, gather_once: bool = False, virtual_stages: int = 1,
              in_flight: int | None = None, overlap: bool = False, slicing=None) -> tuple:
    """(loss, layer grads, head grads, input cotangent [M, mb, S, D]): the decoder layers pipelined over the
    `pipeline` axis, the final norm + loss (scaled by 1 / the global label count) on the last stage.
    ``gather_once``: each stage casts and FSDP-gathers its layer weights once per step (``_gather_stage_once``)."""
    config, llm = model.config, model.llm
    M = outside.rows.microbatches
    values, _ = llm.layer_params()
    layer_fn, window_codes = _stage_layer(llm)
    # Weights enter the pipeline in their storage layout (FSDP- and tensor-sharded over the non-pipeline axes);
    # each layer gathers what it must (``use_params``) and its einsums keep the tensor-parallel layout, or with
    # ``gather_once`` the stage gathers them all once, in the compute dtype, before its first tick.
    stacked = {"weights": values}
    if window_codes is not None:
        stacked["window"] = window_codes
    aux = {k: batch[k] for k in META_KEYS}
    aux = llm_meta(config, TokenMeta(*(jnp.asarray(aux[k], jnp.int32) for k in META_KEYS)))._asdict()
    rope = batch.get("rope_positions")
    if rope is not None:  # [M, mb, S, 3]: each microbatch's M-RoPE positions, moved with its tokens
        check_rope_positions(config.llm, rope[0], tuple(rope.shape[1:3]))  # refused without mrope_section
        aux["rope_positions"] = jnp.asarray(rope, jnp.int32)
    aux["labels"] = labels
    aux["inv_count"] = jnp.broadcast_to(inv_count, (M,))
    n_moe = len(config.llm.moe_layers)
    if n_moe:
        # Each microbatch's router losses weigh by its label count, as in the plain step (train.step.moe_model_loss).
        count_M = jnp.sum((labels != IGNORE).astype(jnp.float32), axis=tuple(range(1, labels.ndim)))
        aux["moe_weight"] = count_M * inv_count / n_moe
    layers_train = llm_layers_trainable(config)
    # Which leaves of a layer train: with LoRA on the LLM its adapters only (no dW of the base weights is computed);
    # the window codes never.
    lora_only = lora_lib.lora_for(config, "llm") is not None
    param_trainable = {"weights": jax.tree_util.tree_map_with_path(
        lambda path, _: not lora_only or any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in path), values)}
    if window_codes is not None:
        param_trainable["window"] = False
    with model.scope("llm"):  # the LLM's rules: what use_params gathers, how the layers' einsums lay out
        loss_params = llm.head_params()
        out = pipeline_value_and_grad(
            layer_fn,
            stacked,
            outside.x_M,
            loss_fn=_loss_fn(llm, chunk),
            loss_params=loss_params,
            aux=aux,
            stage_layers=stage_layers,
            mesh=mesh,
            trainable_layers=np.full(config.llm.n_layers, layers_train),
            input_requires_grad=outside.needs_grad,
            loss_params_trainable=llm_base_trainable(config),
            schedule=schedule,
            param_trainable=param_trainable,
            gather_params=_gather_stage_once(llm) if gather_once else None,
            virtual_stages=virtual_stages if schedule == "interleaved" else None,
            max_in_flight=in_flight if schedule == "zb_v" else None,
            overlap=overlap,
            slicing=slicing,
            microbatches=M,
            prepare=outside.prepare,
        )
    loss, (g_layers, g_loss_params, dx_M) = out[:2]
    return loss, g_layers, g_loss_params, dx_M, out[2] if outside.prepare is not None else None


def _gather_grads(outside: _Outside, g_layers, g_loss_params, dx_M) -> nnx.State:
    """The gradients in the trainable state's layout: the input cotangent pulled through the embedding vjp (zeros
    when nothing outside trains), plus the pipeline's layer and head gradients into the LLM's entries."""
    if outside.embed_vjp is not None:
        emb = outside.emb
        dx = outside.rows.to_rows(dx_M.astype(emb.dtype))
        want = getattr(jax.typeof(emb), "sharding", None)
        if want is not None and want.mesh.axis_names and jax.typeof(dx).sharding != want:
            dx = jax.sharding.reshard(dx, want)
        (grads,) = outside.embed_vjp(dx)
    else:
        grads = jax.tree.map(jnp.zeros_like, outside.trainable)
    pure = nnx.to_pure_dict(grads)
    if "llm" in pure:
        _add_into(pure["llm"], {"layers": g_layers["weights"], **g_loss_params})
    nnx.replace_by_pure_dict(grads, pure)
    return grads
