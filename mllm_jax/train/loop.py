"""The training run: configs -> validated layout -> sharded model -> (resume) -> steps, eval, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.config import ModelConfig
from mllm_jax.data import SyntheticBatches, TextCodec
from mllm_jax.data.batching import IGNORE, unstack_first
from mllm_jax.data.tokenizer import COLOURS, COLS, NUMBER_WORDS, ROWS, SHAPES, TONES_HZ
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.config import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig
from mllm_jax.train.metrics import MetricsWriter
from mllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mllm_jax.train.step import make_eval_step, make_train_step, model_loss
from parallel.config import ParallelConfig

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    train: TrainConfig


class NonFiniteLossError(RuntimeError):
    pass


def load_run_config(gin_files=(), gin_params=()) -> RunConfig:
    from mllm_jax import gin_setup

    gin_setup.parse(gin_files, gin_params)
    return RunConfig(*(gin_setup.build(c) for c in (ModelConfig, ParallelConfig, DataConfig, OptimizerConfig,
                                                     CheckpointConfig, TrainConfig)))


# ----------------------------------------------------------------------------------------------------------------
# Validation: every error here happens before anything is built or compiled, and names the numbers.


def validate(cfg: RunConfig, num_devices: int) -> None:
    pc, mc, dc, tc = cfg.parallel, cfg.model, cfg.data, cfg.train
    sizes = pc.axis_sizes
    if any(v < 1 for v in sizes.values()) or pc.microbatches < 1:
        raise ValueError(f"ParallelConfig sizes must be >= 1; got {sizes}, microbatches={pc.microbatches}")
    if pc.num_devices != num_devices:
        prod = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"the mesh {prod} has {pc.num_devices} devices but {num_devices} are available; "
                         f"make the product of ParallelConfig sizes equal {num_devices}")
    if pc.pipeline > 1:
        raise ValueError(f"ParallelConfig.pipeline={pc.pipeline}: the pipelined train step is not wired into "
                         f"train.py yet; use pipeline=1 (fold the devices into data or fsdp)")
    if pc.context > 1:
        raise ValueError(f"ParallelConfig.context={pc.context}: context-parallel training is not wired into "
                         f"train.py yet; use context=1")
    heads = {"LLMConfig.n_heads": mc.llm.n_heads, "LLMConfig.n_kv_heads": mc.llm.n_kv_heads}
    for name, enc in mc.encoders.items():
        heads[f"encoders[{name!r}].n_heads"] = enc.n_heads
    for what, n in heads.items():
        if n % pc.tensor:
            raise ValueError(f"{what}={n} is not divisible by ParallelConfig.tensor={pc.tensor}")
    shards = pc.data * pc.fsdp * pc.microbatches
    if dc.batch_size % shards:
        raise ValueError(f"DataConfig.batch_size={dc.batch_size} is not divisible by data x fsdp x microbatches = "
                         f"{pc.data} x {pc.fsdp} x {pc.microbatches} = {shards}")
    for field in ("steps", "log_every", "checkpoint_every"):
        if getattr(tc, field) < 1:
            raise ValueError(f"TrainConfig.{field} must be >= 1; got {getattr(tc, field)}")


# ----------------------------------------------------------------------------------------------------------------
# Building.


def build_mesh(pc: ParallelConfig):
    from parallel.mesh import make_mesh

    return make_mesh(pc)


def batch_sharding(mesh, ndim: int, leading: int, dim: int) -> NamedSharding:
    """Shard axis ``leading`` (the batch axis) over the data and fsdp mesh axes of size > 1 (the model's specs leave
    size-1 axes out, and Explicit sharding types must agree), where that divides; else replicate."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec = [None] * ndim
    if axes and dim % n == 0:
        spec[leading] = axes if len(axes) > 1 else axes[0]
    return NamedSharding(mesh, P(*spec))


def put_batch(batch, mesh, *, leading: int):
    """Token arrays [.., B, S] sharded over data x fsdp on the batch axis. Encoder inputs go replicated: the model's
    encoders do not yet take a batch-sharded pixel array under Explicit axes (vision.embed's reshape), and DESIGN.md
    has the model spread the encoder batch over every mesh axis itself."""
    out = {}
    for key, value in batch.items():
        if key == "encoder_inputs":
            out[key] = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), value)
        else:
            out[key] = jax.tree.map(
                lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim, leading, x.shape[leading])), value)
    return out


def create_model(cfg: RunConfig, mesh):
    from mllm_jax.build import create_model as build_model

    return build_model(cfg.model, mesh, cfg.parallel, cfg.train.seed)


def trainable_filter(model_config):
    from mllm_jax.freeze import trainable_filter as tf

    return tf(model_config)


def make_nnx_optimizer(model, tx, trainable):
    """nnx.Optimizer whose state is laid out like the parameters it belongs to.

    Flax creates optimizer-state variables from the parameters' metadata, where our parameters carry *logical* axis
    names whose rules differ per module (and are only in force while that module is built). Recording each
    parameter's concrete sharding as its ``optimizer_sharding`` makes the moments land exactly where the parameter is.
    """
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and hasattr(var.get_value(), "sharding"):
            var.set_metadata("optimizer_sharding", var.get_value().sharding.spec)
    return nnx.Optimizer(model, tx, wrt=trainable)


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _checkpoint_tree(model, optimizer) -> dict:
    return {"model": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))),
            "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _apply_checkpoint_tree(model, optimizer, tree) -> None:
    ms = nnx.state(model, nnx.Not(nnx.RngState))
    nnx.replace_by_pure_dict(ms, tree["model"])
    nnx.update(model, ms)
    os_ = nnx.state(optimizer)
    nnx.replace_by_pure_dict(os_, tree["optimizer"])
    nnx.update(optimizer, os_)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def caption_word_groups(codec: TextCodec) -> dict[str, np.ndarray]:
    """Token ids of the caption words that can only be right by looking at the input, per group."""
    ids = lambda words: np.asarray([codec.token_id(str(w)) for w in words])  # noqa: E731
    return {
        "image_words": ids(COLOURS + SHAPES + ROWS + COLS),
        "colour": ids(COLOURS),
        "shape": ids(SHAPES),
        "position": ids(ROWS + COLS),
        "audio_words": ids(TONES_HZ),
        "text_words": ids(NUMBER_WORDS),
    }


def evaluate(eval_fn, model_state, eval_batches, mesh, groups: dict) -> dict:
    loss_sum = count = 0.0
    correct = total = 0
    g_correct = {k: 0 for k in groups}
    g_total = {k: 0 for k in groups}
    for batch in eval_batches:
        s, c, pred = eval_fn(model_state, put_batch(batch, mesh, leading=0))
        loss_sum += float(s)
        count += float(c)
        labels = batch["labels"]
        pred = np.asarray(pred)
        valid = labels != IGNORE
        hit = (pred == labels) & valid
        correct += int(hit.sum())
        total += int(valid.sum())
        for k, ids in groups.items():
            sel = valid & np.isin(labels, ids)
            g_correct[k] += int((hit & sel).sum())
            g_total[k] += int(sel.sum())
    out = {"eval_loss": loss_sum / max(count, 1.0), "eval_accuracy": correct / max(total, 1)}
    for k in groups:
        if g_total[k]:
            out[f"eval_accuracy_{k}"] = g_correct[k] / g_total[k]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run.


class _Preemption:
    """SIGTERM -> finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _write_text(workdir: str, name: str, text: str) -> None:
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)


def run(cfg: RunConfig, workdir: str, *, loss_fn: Callable = model_loss, stop_after_step: int | None = None,
        config_text: str | None = None, log: Callable = print) -> dict:
    """Trains (or resumes) in ``workdir``; returns a summary. ``stop_after_step`` ends early as a preemption would
    (checkpoint saved), for tests of resumption."""
    validate(cfg, jax.device_count())
    tc = cfg.train
    if stop_after_step is None:
        stop_after_step = tc.stop_at_step
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    codec = TextCodec()
    train_data = SyntheticBatches(cfg.model, cfg.data, microbatches=cfg.parallel.microbatches, codec=codec)
    eval_data = SyntheticBatches(cfg.model, cfg.data, split="eval", codec=codec)
    if main:
        if config_text is not None:
            _write_text(workdir, "config.gin", config_text)
        _write_text(workdir, "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        codec.tokenizer.save(os.path.join(workdir, "tokenizer.json"))

    ckpt_cfg = cfg.checkpoint
    ckpt = Checkpointer(workdir, every=ckpt_cfg.every or tc.checkpoint_every, keep=ckpt_cfg.keep,
                        async_save=ckpt_cfg.async_save)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            ckpt.check_compatible(latest, None, cfg.model)  # before building or compiling anything
        except ValueError:
            ckpt.close()
            raise
    mesh = build_mesh(cfg.parallel)
    with jax.set_mesh(mesh):
        model = create_model(cfg, mesh)
        trainable = trainable_filter(cfg.model)
        schedule = learning_rate_schedule(cfg.optimizer, tc.steps)
        optimizer = make_nnx_optimizer(model, make_optimizer(cfg.optimizer, tc.steps), trainable)
        n_train = _count(nnx.state(model, trainable))
        n_all = _count(nnx.state(model, nnx.Param))
        log(f"mesh {dict(mesh.shape)}; parameters: {n_train:,} trainable, {n_all - n_train:,} frozen")

        start = 0
        if latest is not None:
            abstract = _abstract(_checkpoint_tree(model, optimizer))
            ckpt.check_compatible(latest, abstract, cfg.model)
            tree, data_state = ckpt.restore(latest, abstract)
            _apply_checkpoint_tree(model, optimizer, tree)
            train_data.restore(data_state)
            start = latest
            log(f"resumed from step {latest} in {ckpt.directory}")

        graphdef, state = nnx.split((model, optimizer))
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = jax.jit(make_train_step(graphdef, trainable, loss_fn=loss_fn, schedule=schedule),
                          out_shardings=(state_shardings, None), donate_argnums=0)
        model_graphdef = nnx.graphdef(model)
        eval_fn = jax.jit(make_eval_step(model_graphdef))
        eval_batches = [unstack_first(eval_data.batch_at(i)) for i in range(cfg.data.eval_batches)]
        groups = caption_word_groups(codec)

        def current_model_state():
            m, _ = nnx.merge(graphdef, state)
            return nnx.state(m)

        def save(step: int):
            m, o = nnx.merge(graphdef, state)
            ckpt.save(step, _checkpoint_tree(m, o), train_data.state(), cfg.model)

        metrics = MetricsWriter(workdir, total_steps=tc.steps, initial_step=start,
                                progress_bar=tc.progress_bar, is_main_process=main)
        summary = {"start_step": start, "preempted": False, "last_eval": None}
        step, loss = start, None
        window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0
        last_good_saved = latest
        try:
            with _Preemption() as preempt:
                while step < tc.steps:
                    host_batch = next(train_data)
                    tokens = int((host_batch["segment_ids"] != 0).sum())
                    t0 = time.perf_counter()
                    state, m = step_fn(state, put_batch(host_batch, mesh, leading=1))
                    loss = float(m["loss"])  # a sync per step: a non-finite loss is caught before any save
                    step_time = time.perf_counter() - t0
                    step += 1
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss is {loss} at step {step}; stopping. The last good checkpoint is step "
                            f"{last_good_saved} in {ckpt.directory}")
                    window_tokens += tokens
                    window_steps += 1
                    metrics.advance(step, {"loss": loss})
                    row = None
                    if step % tc.log_every == 0 or step == tc.steps:
                        elapsed = time.perf_counter() - window_t0
                        row = {"loss": loss, "learning_rate": float(m["learning_rate"]),
                               "grad_norm": float(m["grad_norm"]), "tokens_per_s": window_tokens / elapsed,
                               "step_time_s": elapsed / window_steps, "last_step_time_s": step_time}
                    if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                        ev = evaluate(eval_fn, current_model_state(), eval_batches, mesh, groups)
                        summary["last_eval"] = ev
                        row = {**(row or {"loss": loss}), **ev}
                    if row is not None:
                        metrics.write(step, row)
                        window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0
                    stop_now = preempt.requested or (stop_after_step is not None and step >= stop_after_step)
                    if step % ckpt.every == 0 or step == tc.steps or stop_now:
                        save(step)
                        last_good_saved = step
                    if stop_now:
                        summary["preempted"] = True
                        log(f"stopping at step {step} ({'SIGTERM' if preempt.requested else 'stop_after_step'}); "
                            f"checkpoint saved")
                        break
        finally:
            ckpt.close()
            metrics.close()
        summary.update(end_step=step, loss=loss)
        return summary
