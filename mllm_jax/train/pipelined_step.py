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
from mllm_jax.multimodal import ENCODER_KEYS, encoder_is_frozen, llm_meta, num_features
from mllm_jax.parallel.conveyor import slots_per_device
from mllm_jax.parallel.pipeline import pipeline_value_and_grad
from mllm_jax.parallel.pipeline_plan import plan_pipeline

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
    outside = _embed_outside(model, batch, microbatch_rows(model, mesh, M, mb, seq))
    gather_once = parallel_config.pipeline_fsdp_gather_once and dict(mesh.shape).get("fsdp", 1) > 1
    loss, g_layers, g_loss_params, dx_M = _pipeline(model, batch, outside, labels, inv_count, mesh=mesh,
                                                    stage_layers=stage_layers, chunk=chunk, schedule=schedule,
                                                    gather_once=gather_once,
                                                    virtual_stages=parallel_config.chunks_per_device(schedule),
                                                    in_flight=parallel_config.pipeline_in_flight,
                                                    overlap=parallel_config.pipeline_overlap_comm, slicing=slicing)
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
        inputs = batch.get("encoder_inputs") or {}
        instances = {k: max(1, jax.tree.leaves(x)[0].shape[1] // mb) for k, x in inputs.items()} or None
        return planned_runtime(config, pc, text_tokens=seq, microbatch_size=mb, instances=instances)

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


class _Outside(NamedTuple):
    """What runs outside the pipeline: the injected embeddings (flat rows, and [P K, mb, S, D] for the pipeline: its
    ``rows`` layout), the trainable state they were differentiated against, and their vjp (None when nothing upstream
    trains)."""

    emb: jax.Array
    x_M: jax.Array
    rows: MicrobatchRows
    trainable: nnx.State
    embed_vjp: Callable | None


def _with_batch_axes(rule_table, axes: tuple):
    """The model's rule table with the LLM's "batch" mapped to ``axes`` (a model without rules: that one rule)."""
    if rule_table is None:
        return (("llm", (("batch", axes),)),)
    return tuple((key, tuple((n, axes if n == "batch" else v) for n, v in rules) if key == "llm" else rules)
                 for key, rules in rule_table)


def _embed_outside(model, batch: dict, rows: MicrobatchRows) -> _Outside:
    """Encoders, projectors, injection and the token embedding over all microbatches at once, differentiated by one
    vjp when anything in them trains (``embedding_requires_grad``). The token embedding and the injection run on
    ``rows``' layout, so each device makes the inputs of its own microbatches' rows only."""
    config = model.config
    modalities = sorted({name for key in ENCODER_KEYS for name in (batch.get(key) or {})})
    flat = flatten_microbatches(batch, {name: num_features(config, name) for name in modalities}, rows=rows.to_rows)
    rule_table = _with_batch_axes(model.rule_table, (PIPELINE, *rows.axes))
    gdef, trainable, frozen, rest = nnx.split(model, trainable_filter(config), nnx.Param, ...)

    def embed(tr):
        m = nnx.merge(gdef, tr, frozen, rest)
        m.rule_table = rule_table  # the LLM's rows over (`pipeline`, its batch axes): rows.to_rows' layout
        return m.embed(flat)

    embed_vjp = None
    if embedding_requires_grad(config, modalities):
        emb, embed_vjp = jax.vjp(embed, trainable)
    else:
        emb = embed(trainable)
    return _Outside(emb, rows.to_microbatches(emb), rows, trainable, embed_vjp)


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
        loss, (g_layers, g_loss_params, dx_M) = pipeline_value_and_grad(
            layer_fn,
            stacked,
            outside.x_M,
            loss_fn=_loss_fn(llm, chunk),
            loss_params=loss_params,
            aux=aux,
            stage_layers=stage_layers,
            mesh=mesh,
            trainable_layers=np.full(config.llm.n_layers, layers_train),
            input_requires_grad=outside.embed_vjp is not None,
            loss_params_trainable=llm_base_trainable(config),
            schedule=schedule,
            param_trainable=param_trainable,
            gather_params=_gather_stage_once(llm) if gather_once else None,
            virtual_stages=virtual_stages if schedule == "interleaved" else None,
            max_in_flight=in_flight if schedule == "zb_v" else None,
            overlap=overlap,
            slicing=slicing,
            microbatches=M,
        )
    return loss, g_layers, g_loss_params, dx_M


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
