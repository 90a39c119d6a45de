"""The training run: configs -> validated layout -> sharded model -> (resume) -> steps, eval, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from mllm_jax import distributed
from mllm_jax.config import ModelConfig
from mllm_jax.data import SyntheticBatches, TextCodec
from mllm_jax.data.batching import IGNORE, unstack_first
from mllm_jax.data.context_batches import permute_for_context
from mllm_jax.data.datasets.config import DatasetConfig
from mllm_jax.data.datasets.sources import check_dataset_file
from mllm_jax.data.tokenizer import COLOURS, COLS, MOTIONS, NUMBER_WORDS, ROWS, SHAPES, TONES_HZ
from mllm_jax.data import encoder_balance
from mllm_jax.data.train_data import (RealTrainData, SyntheticTrainData, check_encoder_options, load_tokenizer,
                                      uses_real_data)
from mllm_jax.layout import validate_layout
from mllm_jax.train import captions, init_from
from mllm_jax.train.checkpoint import Checkpointer, WorkdirLock
from mllm_jax.train.config import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig
from mllm_jax.train.metrics import MetricsWriter, moe_fields
from mllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mllm_jax.train.step import make_eval_step, make_train_step, model_loss
from mllm_jax.parallel.config import AUTO, ContextConfig, ParallelConfig

BATCH_AXES = distributed.BATCH_AXES


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig  # with PretrainedConfig set: the architecture resolved from the checkpoints' config.json
    parallel: ParallelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    train: TrainConfig
    dataset: DatasetConfig | None = None  # a real dataset when its path is set; else the synthetic stream
    pretrained: object | None = None  # mllm_jax.hf.recipe.PretrainedConfig; None or empty: fresh initialisation


class NonFiniteLossError(RuntimeError):
    pass


def load_run_config(gin_files=(), gin_params=()) -> RunConfig:
    from mllm_jax import gin_setup
    from mllm_jax.hf import recipe

    recipe.register()  # PretrainedConfig bindings must parse
    gin_setup.parse(gin_files, gin_params)
    parts = [gin_setup.build(c) for c in (ModelConfig, ParallelConfig, DataConfig, OptimizerConfig, CheckpointConfig,
                                          TrainConfig, DatasetConfig)]
    # `ContextConfig.mode = "zigzag"` alone must count: ParallelConfig's default context_config is a plain
    # ContextConfig() that gin never sees unless the recipe writes `ParallelConfig.context_config = @ContextConfig()`.
    if parts[1].context_config == ContextConfig():
        parts[1] = dataclasses.replace(parts[1], context_config=gin_setup.build(ContextConfig))
    pretrained = recipe.build_pretrained_config()
    if not pretrained.empty:
        # Validation, the data pipeline and checkpoint checks all need the real architecture, read from config.json.
        parts[0] = recipe.resolve_model_config(parts[0], pretrained)
    return RunConfig(*parts, pretrained=pretrained)


# ----------------------------------------------------------------------------------------------------------------
# Validation: every error here happens before anything is built or compiled, and names the numbers.


def for_devices(cfg: RunConfig, num_devices: int, chip=None) -> RunConfig:
    """``cfg`` with its layout's -1 sizes filled for ``num_devices`` devices (mllm_jax.parallel.fill) and
    ``microbatches="auto"`` resolved to the planner's count (train.microbatch_choice; priced on ``chip``, a
    targets.Chip, default this process's accelerator)."""
    from mllm_jax.parallel.fill import fill_layout

    batch = None if uses_real_data(cfg.dataset) else cfg.data.batch_size
    parallel = fill_layout(cfg.parallel, num_devices, batch)
    filled = cfg if parallel == cfg.parallel else dataclasses.replace(cfg, parallel=parallel)
    if parallel.microbatches == AUTO:
        from mllm_jax.train.microbatch_choice import auto_microbatches

        # The planner prices a layout that exists: the axes checked first (with a stand-in count: one group of
        # the stages, which every schedule takes).
        validate_layout(dataclasses.replace(parallel, microbatches=parallel.pipeline), cfg.model, num_devices)
        m = auto_microbatches(filled, chip=chip)
        filled = dataclasses.replace(filled, parallel=dataclasses.replace(parallel, microbatches=m))
    return filled


def validate(cfg: RunConfig, num_devices: int) -> None:
    pc, mc, dc, tc = cfg.parallel, cfg.model, cfg.data, cfg.train
    validate_layout(pc, mc, num_devices)
    check_encoder_options(dc, mc, pc, real_data=uses_real_data(cfg.dataset))
    if pc.context > 1:
        from mllm_jax.parallel.context import MODES

        cc = pc.context_config
        if cc.mode not in MODES:
            raise ValueError(f"ContextConfig.mode must be one of {MODES}; got {cc.mode!r}")
        if cc.mode == "lpt" and jax.process_count() > 1:
            raise ValueError("ContextConfig.mode='lpt' plans over the whole batch and its padded length depends on "
                             "it, but each host permutes only its own rows: use 'balanced', 'zigzag' or 'uniform' "
                             f"with {jax.process_count()} processes")
    shards = pc.data * pc.fsdp * pc.microbatches
    if not uses_real_data(cfg.dataset) and dc.batch_size % shards:
        raise ValueError(f"DataConfig.batch_size={dc.batch_size} is not divisible by data x fsdp x microbatches = "
                         f"{pc.data} x {pc.fsdp} x {pc.microbatches} = {shards}")
    for field in ("steps", "log_every", "checkpoint_every"):
        if getattr(tc, field) < 1:
            raise ValueError(f"TrainConfig.{field} must be >= 1; got {getattr(tc, field)}")
    if tc.eval_captions < 0:
        raise ValueError(f"TrainConfig.eval_captions must be >= 0 (0: no captioning); got {tc.eval_captions}")


# ----------------------------------------------------------------------------------------------------------------
# Building.


def build_mesh(pc: ParallelConfig):
    from mllm_jax.parallel.mesh import make_mesh

    return make_mesh(pc)


def put_batch(batch, mesh, *, leading: int, rule_table=None):
    # encoder_balance.place: placement.put_batch, then (several processes) the balanced encoder rows' device move.
    return encoder_balance.place(batch, mesh, leading=leading, rule_table=rule_table)


def create_model(cfg: RunConfig, mesh):
    """The sharded model: pretrained weights streamed in when PretrainedConfig names checkpoints, else fresh."""
    if cfg.pretrained is not None and not cfg.pretrained.empty:
        from mllm_jax.hf.recipe import create_pretrained_model

        model, resolved = create_pretrained_model(cfg.model, mesh, cfg.parallel, cfg.pretrained, cfg.train.seed)
        if resolved != cfg.model:
            raise ValueError(f"the pretrained checkpoints resolve to another model config than at load time: "
                             f"{resolved} vs {cfg.model}")
        return model
    from mllm_jax.build import create_model as build_model

    return build_model(cfg.model, mesh, cfg.parallel, cfg.train.seed)


def make_grads_fn(cfg: RunConfig, mesh):
    """The pipelined loss-and-gradient function when ParallelConfig.pipeline > 1 (None: the plain step)."""
    if cfg.parallel.pipeline == 1:
        return None
    from mllm_jax.train.pipelined_step import pipelined_loss_and_grad

    def grads_fn(model, batch):
        return pipelined_loss_and_grad(model, batch, mesh=mesh, parallel_config=cfg.parallel)

    return grads_fn


def prepare_host_batch(batch: dict, cfg: RunConfig, *, leading: int, whole_batch: bool = False) -> dict:
    """Host-side transforms before placement: the context-parallel permutation when ParallelConfig.context > 1; the
    encoder instances assigned to devices by cost (DataConfig.encoder_balance; ``whole_batch``: every host holds all
    rows, as for held-out batches; else, with several processes, a collective over the hosts' metadata)."""
    if cfg.parallel.context > 1:
        batch, _ = permute_for_context(batch, cfg.parallel, leading=leading, llm_config=cfg.model.llm,
                                       attention_impl=cfg.model.attention_impl)  # count the kernel's own tiles
    return encoder_balance.prepare(batch, cfg.model, cfg.parallel, cfg.data.encoder_balance, leading=leading,
                                   whole_batch=whole_batch)


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


def caption_word_groups(codec: TextCodec) -> dict[str, np.ndarray | tuple]:
    """Token ids of the caption words that can only be right by looking at the input, per group. A group is an id
    array, or (ids, after, follows): then only labels whose preceding token is (follows) / is not (not follows) the id
    ``after`` count: a video's motion word follows "moving" ("a red circle moving left"), and "left" / "right" are
    also an image's column words."""
    ids = lambda words: np.asarray([codec.token_id(str(w)) for w in words])  # noqa: E731
    moving = codec.token_id("moving")
    return {
        "image_words": ids(COLOURS + SHAPES + ROWS + COLS + MOTIONS),
        "colour": ids(COLOURS),
        "shape": ids(SHAPES),
        "position": (ids(ROWS + COLS), moving, False),
        "motion": (ids(MOTIONS), moving, True),
        "audio_words": ids(TONES_HZ),
        "text_words": ids(NUMBER_WORDS),
    }


def evaluate(eval_fn, model_state, eval_batches, put: Callable, groups: dict) -> dict:
    """``eval_batches``: whole global batches [B, S] on every host (context-permuted when context > 1: predictions
    and labels are then compared in the same permuted order). ``put`` places one on the mesh (this host's rows)."""
    loss_sum = count = 0.0
    correct = total = 0
    g_correct = {k: 0 for k in groups}
    g_total = {k: 0 for k in groups}
    for batch in eval_batches:
        # to_host gathers what spans other processes' devices (collective: every process calls it).
        s, c, pred = distributed.to_host(eval_fn(model_state, put(batch)))
        loss_sum += float(s)
        count += float(c)
        labels = batch["labels"]
        pred = np.asarray(pred)
        valid = labels != IGNORE
        hit = (pred == labels) & valid
        correct += int(hit.sum())
        total += int(valid.sum())
        for k, group in groups.items():
            ids, after, follows = group if isinstance(group, tuple) else (group, None, None)
            sel = valid & np.isin(labels, ids)
            if after is not None:  # labels[t] is the token after input_ids[t]
                sel &= (np.asarray(batch["input_ids"]) == after) == follows
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
    """SIGTERM or SIGINT (Ctrl-C) -> finish the current step, save, exit cleanly. A second SIGINT aborts at once
    (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to restore
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
        if signum == signal.SIGINT:
            print("SIGINT: finishing this step and saving a checkpoint; press Ctrl-C again to abort",
                  file=sys.stderr, flush=True)
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _write_text(workdir: str, name: str, text: str) -> None:
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)


def run(cfg: RunConfig, workdir: str, *, loss_fn: Callable = model_loss, stop_after_step: int | None = None,
        config_text: str | None = None, log: Callable = print) -> dict:
    """Trains (or resumes) in ``workdir``; returns a summary. ``stop_after_step`` ends early as a preemption would
    (checkpoint saved), for tests of resumption. Every process of a multi-host job runs this; process 0 alone writes
    the metrics and the once-per-run files, and holds the workdir's lock ({workdir}/lock: host and pid) while it
    runs: a second run on the same workdir is refused, a stale lock (its process gone) is taken over."""
    filled = for_devices(cfg, jax.device_count())
    if filled is not cfg:
        why = [w for w, given in (("sizes given as -1 filled", -1 in cfg.parallel.axis_sizes.values()
                                   or cfg.parallel.microbatches == -1),
                                  ("microbatches \"auto\": the planner's count", cfg.parallel.microbatches == AUTO))
               if given]
        log("layout for " + str(jax.device_count()) + " devices: " + " ".join(
            f"{a}={s}" for a, s in filled.parallel.axis_sizes.items() if s > 1) + f" microbatches="
            f"{filled.parallel.microbatches} ({'; '.join(why)})")
    cfg = filled
    validate(cfg, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir, log=log) if distributed.is_main_process() else None
    if lock is not None:
        lock.acquire()
    try:
        return _run(cfg, workdir, loss_fn=loss_fn, stop_after_step=stop_after_step, config_text=config_text, log=log)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: RunConfig, workdir: str, *, loss_fn: Callable, stop_after_step: int | None, config_text: str | None,
         log: Callable) -> dict:
    """The run, step by step: open the data and the checkpoints (every check that can refuse the run happens here),
    write the once-per-run files, build the mesh, model and optimizer, restore or initialise, compile the steps, then
    train with evaluation, metrics and checkpoints until the last step or a stop."""
    validate(cfg, jax.device_count())
    if stop_after_step is None:
        stop_after_step = cfg.train.stop_at_step
    os.makedirs(workdir, exist_ok=True)
    data = _open_data(cfg)
    ckpt, latest = _open_checkpoints(cfg, workdir, log)
    if distributed.is_main_process():  # only now is this run known to belong here: nothing is written before
        _write_run_files(cfg, workdir, data, config_text)
    mesh = build_mesh(cfg.parallel)
    from mllm_jax.parallel.sharding import rule_table as make_rule_table

    rule_table = make_rule_table(cfg.model, cfg.parallel)
    with jax.set_mesh(mesh):
        model, optimizer, trainable, schedule = _build_model_and_optimizer(cfg, mesh, ckpt, latest, log)
        start, latest, data_state = _restore_or_init(cfg, ckpt, latest, model, optimizer, log)
        _start_train_data(cfg, data, data_state)
        session = _Session(cfg, mesh, rule_table, ckpt, data, model, optimizer, trainable, schedule, loss_fn)
        return _train(session, workdir, start=start, last_good_saved=latest, stop_after_step=stop_after_step,
                      log=log)


@dataclasses.dataclass
class _RunData:
    """The data of a run: ``train`` is this host's training stream (a real dataset's loader is made only once the
    checkpoint's data state is known, by _start_train_data), ``eval`` the synthetic held-out split (None for real
    data), and the tokenizer: ``codec`` (synthetic vocabulary) or ``tokenizer`` (a real dataset's file)."""

    real: bool
    codec: TextCodec | None = None
    tokenizer: object = None
    train: object = None
    eval: SyntheticBatches | None = None


def _open_data(cfg: RunConfig) -> _RunData:
    """The tokenizer and, for synthetic data, the train and eval streams. A real dataset's file is read and checked
    (JSON/UTF-8 errors name the file and line) before anything is built or written."""
    if uses_real_data(cfg.dataset):
        data = _RunData(real=True, tokenizer=load_tokenizer(cfg.data.tokenizer_path))
        check_dataset_file(cfg.dataset)
        return data
    codec = TextCodec()
    return _RunData(real=False, codec=codec,
                    train=SyntheticTrainData(cfg.model, cfg.data, microbatches=cfg.parallel.microbatches, codec=codec),
                    eval=SyntheticBatches(cfg.model, cfg.data, split="eval", codec=codec))


def _open_checkpoints(cfg: RunConfig, workdir: str, log: Callable) -> tuple[Checkpointer, int | None]:
    """The checkpointer and the newest intact step (newer broken steps are reported and moved aside), checked
    compatible with the model config before anything is built or compiled."""
    ckpt_cfg = cfg.checkpoint
    ckpt = Checkpointer(workdir, every=ckpt_cfg.every or cfg.train.checkpoint_every, keep=ckpt_cfg.keep,
                        async_save=ckpt_cfg.async_save)
    latest = ckpt.newest_intact_step(log=log)
    if latest is not None:
        try:
            ckpt.check_compatible(latest, None, cfg.model)
        except ValueError:
            ckpt.close()
            raise
    return ckpt, latest


def _write_run_files(cfg: RunConfig, workdir: str, data: _RunData, config_text: str | None) -> None:
    """Process 0's once-per-run files, in this order: config.gin (when given), run_config.json, tokenizer.json."""
    if config_text is not None:
        _write_text(workdir, "config.gin", config_text)
    _write_text(workdir, "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    (data.tokenizer or data.codec.tokenizer).save(os.path.join(workdir, "tokenizer.json"))


def _build_model_and_optimizer(cfg: RunConfig, mesh, ckpt: Checkpointer, latest: int | None, log: Callable):
    """(model, optimizer, trainable filter, learning-rate schedule) on ``mesh`` (inside jax.set_mesh). Weights named
    by init_from are loaded unless resuming, before the optimizer exists so its state follows their layout."""
    tc = cfg.train
    model = create_model(cfg, mesh)
    try:
        init_from.maybe_init(model, cfg, resuming=latest is not None, log=log)
    except ValueError:
        ckpt.close()
        raise
    trainable = trainable_filter(cfg.model)
    schedule = learning_rate_schedule(cfg.optimizer, tc.steps)
    optimizer = make_nnx_optimizer(model, make_optimizer(cfg.optimizer, tc.steps), trainable)
    n_train = _count(nnx.state(model, trainable))
    n_all = _count(nnx.state(model, nnx.Param))
    log(f"mesh {dict(mesh.shape)}; parameters: {n_train:,} trainable, {n_all - n_train:,} frozen")
    return model, optimizer, trainable, schedule


def _restore_or_init(cfg: RunConfig, ckpt: Checkpointer, latest: int | None, model, optimizer,
                     log: Callable) -> tuple[int, int | None, dict | None]:
    """(first step, newest checkpointed step, the data iterator's state): the newest verified, finite checkpoint is
    loaded into ``model`` and ``optimizer`` (else the next older); none usable: the fresh model from step 0."""
    start, data_state = 0, None
    if latest is not None:
        abstract = _abstract(_checkpoint_tree(model, optimizer))
        ckpt.check_compatible(latest, abstract, cfg.model)
        restored = ckpt.restore_newest(latest, abstract, log=log)
        if restored is None:
            log(f"no usable checkpoint left in {ckpt.directory}: starting from step 0")
        else:
            latest, tree, data_state = restored
            _apply_checkpoint_tree(model, optimizer, tree)
            start = latest
            log(f"resumed from step {latest} in {ckpt.directory}")
    return start, latest, data_state


def _start_train_data(cfg: RunConfig, data: _RunData, data_state: dict | None) -> None:
    """Puts the training stream at the restored position: a real dataset's loader (and its prefetch thread) starts
    there; the synthetic stream is moved there."""
    if data.real:
        data.train = RealTrainData(cfg.dataset, data.tokenizer, cfg.model, cfg.parallel, state=data_state,
                                   encoder_cache=cfg.data.encoder_cache, pretrained=cfg.pretrained)
    elif data_state is not None:
        data.train.restore(data_state)


class _Session:
    """The compiled steps and everything they work on: the (model, optimizer) state as one pytree, the data, the
    held-out batches, the checkpointer; built inside jax.set_mesh."""

    def __init__(self, cfg: RunConfig, mesh, rule_table, ckpt: Checkpointer, data: _RunData, model, optimizer,
                 trainable, schedule, loss_fn: Callable):
        self.cfg, self.mesh, self.rule_table, self.ckpt = cfg, mesh, rule_table, ckpt
        self.train_data = data.train
        if cfg.data.encoder_cache:  # before the first step donates the model's buffers
            self.train_data.use_encoder_cache(model, mesh, cfg.parallel)
        self.graphdef, self.state = nnx.split((model, optimizer))
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.step_fn = jax.jit(make_train_step(self.graphdef, trainable, loss_fn=loss_fn, schedule=schedule,
                                               grads_fn=make_grads_fn(cfg, mesh)),
                               out_shardings=(state_shardings, None), donate_argnums=0)
        self.eval_fn = jax.jit(make_eval_step(nnx.graphdef(model)))
        self.caption_samples, self.caption_builder = [], None  # eval_caption_exact: generated captions
        self.eval_keys = None  # the held-out batches' instance keys when a feature cache serves them
        if data.real:
            self.eval_batches, self.groups = [], {}  # held-out evaluation is the synthetic stream's (real: loss only)
        else:
            self.eval_batches = [unstack_first(data.eval.batch_at(i)) for i in range(cfg.data.eval_batches)]
            # With a feature cache the frozen encoders' eval features are looked up at every evaluation (the first
            # stores them; keyed "eval:...", never a train entry); without one the batches are prepared once here.
            self.eval_keys = [unstack_first(data.eval.instance_keys(i)) for i in range(cfg.data.eval_batches)] \
                if cfg.data.encoder_cache else None
            if self.eval_keys is None:
                self.eval_batches = [self._prepare_eval(b) for b in self.eval_batches]
            self.groups = caption_word_groups(data.codec)
            if self.eval_batches and cfg.train.eval_captions:
                self.caption_samples = captions.held_out_samples(cfg.model, cfg.data, cfg.train.eval_captions,
                                                                 data.codec)
                self.caption_builder = captions.make_builder(cfg.model, cfg.data, data.codec)

    def train_step(self, host_batch: dict) -> dict:
        """One step on this host's rows (already prepared); the state is replaced, the step's metrics returned."""
        self.state, m = self.step_fn(self.state, put_batch(host_batch, self.mesh, leading=1,
                                                           rule_table=self.rule_table))
        return m

    def _prepare_eval(self, batch: dict) -> dict:
        return prepare_host_batch(batch, self.cfg, leading=0, whole_batch=True)

    def put_eval(self, batch: dict) -> dict:
        return put_batch(distributed.take_host_rows(batch, self.mesh, 0), self.mesh, leading=0,
                         rule_table=self.rule_table)

    def evaluate(self) -> dict:
        m, _ = nnx.merge(self.graphdef, self.state)
        batches = self.eval_batches
        if self.eval_keys is not None:
            batches = [self._prepare_eval(self.train_data.cached_eval(b, k))
                       for b, k in zip(self.eval_batches, self.eval_keys)]
        out = evaluate(self.eval_fn, nnx.state(m), batches, self.put_eval, self.groups)
        return {**out, **captions.eval_caption_scores(m, self.caption_builder, self.caption_samples,
                                                      context_config=self.cfg.parallel.context_config)}

    def save(self, step: int) -> None:
        m, o = nnx.merge(self.graphdef, self.state)
        self.ckpt.save(step, _checkpoint_tree(m, o), self.train_data.state(), self.cfg.model)


class _Window:
    """Tokens and steps since the last metrics row, for tokens_per_s and step_time_s."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.patches, self.patch_slots = 0, 0

    def add(self, tokens: int, patch_usage: tuple[int, int] = (0, 0)) -> None:
        self.tokens += tokens
        self.steps += 1
        self.patches += patch_usage[0]
        self.patch_slots += patch_usage[1]

    def rates(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        out = {"tokens_per_s": self.tokens / elapsed, "step_time_s": elapsed / self.steps}
        if self.patch_slots:  # native-resolution rows: the share of patch slots the row buckets padded
            out["patch_padding"] = 1.0 - self.patches / self.patch_slots
        return out


def native_patch_usage(host_batch: dict, model_config) -> tuple[int, int]:
    """(patches holding an instance, patch slots) of the batch's native-resolution modalities' packed rows."""
    used = slots = 0
    for name, x in (host_batch.get("encoder_inputs") or {}).items():
        if model_config.is_native_resolution(name):
            seg = np.asarray(x["segment_ids"])
            used, slots = used + int((seg != 0).sum()), slots + seg.size
    return used, slots


def _check_finite(loss: float, finite: bool, m: dict, step: int, last_good_saved: int | None, directory: str) -> None:
    """NonFiniteLossError when the step's loss, or the update (one flag reduced on device: the gradient norm and the
    updated parameters), is not finite; the step is then neither kept, logged nor saved."""
    if finite and math.isfinite(loss):
        return
    last = (f"The last good checkpoint is step {last_good_saved} in {directory}"
            if last_good_saved is not None else f"No checkpoint was saved in {directory}")
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss} at step {step}; stopping. {last}")
    raise NonFiniteLossError(
        f"non-finite update at step {step}; stopping without saving it (loss {loss}, grad_norm "
        f"{float(m['grad_norm'])}; the parameters after the update hold NaN or inf). {last}")


def _metrics_row(session: _Session, step: int, loss: float, m: dict, step_time: float, window: _Window,
                 summary: dict) -> dict | None:
    """The metrics row of ``step``, or None: the training fields every log_every steps and at the last step, the
    held-out evaluation every eval_every steps and at the last step (recorded in ``summary``)."""
    tc = session.cfg.train
    row = None
    if step % tc.log_every == 0 or step == tc.steps:
        rates = window.rates()
        row = {"loss": loss, "learning_rate": float(m["learning_rate"]), "grad_norm": float(m["grad_norm"]), **rates,
               "last_step_time_s": step_time}
        row.update(moe_fields(m, session.cfg.model.llm.moe_layers))
        if session.train_data.bad_sample_counts is not None:
            row["bad_samples"] = session.train_data.bad_sample_counts
        if session.train_data.cache_counts is not None:  # DataConfig.encoder_cache: hits / misses / corrupt so far
            row["encoder_cache"] = session.train_data.cache_counts
    if session.eval_batches and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
        ev = session.evaluate()
        summary["last_eval"] = ev
        row = {**(row or {"loss": loss}), **ev}
    return row


def _train(session: _Session, workdir: str, *, start: int, last_good_saved: int | None,
           stop_after_step: int | None, log: Callable) -> dict:
    """The step loop from ``start`` to TrainConfig.steps: step, check finiteness, metrics and evaluation, checkpoints;
    SIGTERM/SIGINT or ``stop_after_step`` end it after a saved step. The data, checkpointer and metrics are closed
    however it ends. Returns the run's summary."""
    tc, ckpt, train_data = session.cfg.train, session.ckpt, session.train_data
    mesh, processes = session.mesh, jax.process_count()
    metrics = MetricsWriter(workdir, total_steps=tc.steps, initial_step=start,
                            progress_bar=tc.progress_bar, is_main_process=distributed.is_main_process())
    summary = {"start_step": start, "preempted": False, "last_eval": None}
    step, loss = start, None
    window = _Window()
    try:
        with _Preemption() as preempt:
            while step < tc.steps:
                host_batch = train_data.next_host_batch(mesh)  # this host's rows only
                tokens = int((host_batch["segment_ids"] != 0).sum()) * processes  # hosts' shares are equal
                patch_usage = native_patch_usage(host_batch, session.cfg.model)
                host_batch = prepare_host_batch(host_batch, session.cfg, leading=1)
                t0 = time.perf_counter()
                m = session.train_step(host_batch)
                # A sync per step: the loss, the gradient norm and the updated parameters are checked (one flag,
                # reduced on device) before the step is kept, logged or saved.
                loss, finite = float(m["loss"]), bool(m["finite"])
                step_time = time.perf_counter() - t0
                step += 1
                _check_finite(loss, finite, m, step, last_good_saved, ckpt.directory)
                window.add(tokens, patch_usage)
                metrics.advance(step, {"loss": loss})
                row = _metrics_row(session, step, loss, m, step_time, window, summary)
                if row is not None:
                    metrics.write(step, row)
                    window.reset()
                stop_now = preempt.requested or (stop_after_step is not None and step >= stop_after_step)
                if step % ckpt.every == 0 or step == tc.steps or stop_now:
                    session.save(step)
                    last_good_saved = step
                if stop_now:
                    summary["preempted"] = True
                    log(f"stopping at step {step} ({preempt.signal_name or 'stop_after_step'}); checkpoint saved")
                    break
    finally:
        train_data.close()
        ckpt.close()
        metrics.close()
    summary.update(end_step=step, loss=loss)
    return summary
