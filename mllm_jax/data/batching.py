"""Samples -> batches in the format of docs/contracts.md, and a checkpointable iterator over them.

Layout of one conversation (the chat template):

    <bos> <user> {prompt, with each placeholder token repeated to its feature count} <assistant> {answer} <eos> <pad>...

Labels are the next token, shifted here on the host, and only where the next token belongs to the answer (answer
words and the closing <eos>); everything else (prompt, placeholders, padding) is -100. With packing
(``samples_per_row`` = k) a row holds k conversations as segments 1..k with positions restarting in each. Each media
item gets its own span id (1, 2, ... within the row); feature_index points into the modality's projected features
flattened to [N * T, D], where the encoder rows of a batch are laid out sample-major (the i-th sample of the batch
owns rows i*K .. i*K+K-1), so a batch split along B (microbatches, data shards) splits encoder rows the same way.

A native-resolution modality (NativeVisionConfig, docs/native_resolution.md) instead gets images of several sizes and
short videos (``synthetic.make_native_sample``), made into patches by the processor
(``data.processor.native_vision``), each placeholder run as long as its instance's merged grid, and every instance of
the (micro)batch packed into patch rows by ``data.native_pack`` (a static row bucket; ``BatchBuilder.last_pack`` counts
the padding). With ``LLMConfig.mrope_section`` the batch also gets ``rope_positions`` [B, S, 3], computed per sample.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.batch import IGNORE
from mllm_jax.data import native_pack, synthetic
from mllm_jax.data.native_pack import time_interval  # noqa: F401  (its home is native_pack; kept importable here)
from mllm_jax.data.tokenizer import ASSISTANT, BOS, EOS, PLACEHOLDER_TOKENS, USER, TextCodec


def feature_counts(model_config) -> dict[str, int]:
    """Projected tokens per encoder instance, per fixed-size modality (the placeholder run length); a
    native-resolution modality's count is per instance (its grid) and is not listed."""
    return {name: model_config.features_per_instance(name) for name in model_config.encoders
            if not model_config.is_native_resolution(name)}


def native_modalities(model_config) -> tuple[str, ...]:
    return tuple(n for n in sorted(model_config.encoders) if model_config.is_native_resolution(n))


def uses_mrope(model_config) -> bool:
    """The LLM rotates by (t, h, w) M-RoPE positions: batches carry ``rope_positions``."""
    return bool(getattr(model_config.llm, "mrope_section", None))


def encoder_input_shape(enc) -> tuple[int, ...]:
    """Shape of one instance's encoder input: images [H, W, C], audio [T, n_mels]."""
    if hasattr(enc, "image_size"):
        return (enc.image_size, enc.image_size, enc.num_channels)
    if hasattr(enc, "n_mels"):
        return (enc.num_frames, enc.n_mels)
    raise ValueError(f"unknown encoder config type {type(enc).__name__}")


class BatchBuilder:
    """Turns a list of synthetic samples into one contract batch (numpy)."""

    def __init__(self, model_config, data_config, codec: TextCodec | None = None):
        self.model_config = model_config
        self.data_config = data_config
        self.codec = codec or TextCodec()
        self.counts = feature_counts(model_config)
        self.native = native_modalities(model_config)
        self.slots = {name: (data_config.max_images if name == "vision" else data_config.max_audio)
                      for name in model_config.encoders if name not in self.native}
        self.shapes = {name: encoder_input_shape(model_config.encoders[name]) for name in self.slots}
        self.processors = {}
        for name in self.native:
            from mllm_jax.data.processor.native_vision import NativeVisionProcessor

            self.processors[name] = NativeVisionProcessor.for_model(model_config.encoders[name])
        self.last_pack: dict = {}  # {modality: {"patches": used, "padding": padded}} of the last native build
        self.placeholder_ids = self.codec.placeholder_ids()
        for name in model_config.encoders:
            if name not in PLACEHOLDER_TOKENS:
                raise ValueError(f"the synthetic data knows modalities {tuple(PLACEHOLDER_TOKENS)}; the model has "
                                 f"an encoder named {name!r}")
            want = self.placeholder_ids[name]
            got = model_config.placeholder_ids.get(name)
            if got != want:
                raise ValueError(f"ModelConfig.placeholder_ids[{name!r}] is {got}, but the tokenizer's "
                                 f"{PLACEHOLDER_TOKENS[name]} id is {want}")
        if model_config.llm.vocab_size < self.codec.vocab_size:
            raise ValueError(f"LLMConfig.vocab_size ({model_config.llm.vocab_size}) is smaller than the synthetic "
                             f"tokenizer's vocabulary ({self.codec.vocab_size})")
        self._prefix = self.codec.encode(f"{BOS} {USER}")
        self._assistant = self.codec.encode(ASSISTANT)
        self._eos = self.codec.encode(EOS)

    def sample_tokens(self, sample: synthetic.Sample, native_counts: dict | None = None) -> tuple[np.ndarray, int]:
        """Token ids with placeholder runs expanded, and the index where the answer starts. ``native_counts``:
        {modality: [tokens of the sample's j-th item]} for native-resolution modalities (each item its own count)."""
        if native_counts is None and self.native:  # callers that only need the tokens (captions' prompts)
            native_counts = {n: [self.processors[n].tokens(self.native_instance(n, d, 0, sample.task)[0])
                                 for m, d in sample.media if m == n] for n in self.native}
        prompt = self.codec.encode(sample.prompt)
        parts = [self._prefix]
        seen = {}
        for tok in prompt:
            name = next((n for n, i in self.placeholder_ids.items() if i == tok), None)
            if name in self.native:
                j = seen[name] = seen.get(name, -1) + 1
                counts = (native_counts or {}).get(name, [])
                if j >= len(counts):
                    raise ValueError(f"sample ({sample.task}) has {j + 1} {name!r} placeholders but "
                                     f"{len(counts)} {name!r} items")
                parts.append(np.full(counts[j], tok, np.int32))
                continue
            parts.append(np.full(self.counts[name], tok, np.int32) if name in self.counts else np.asarray([tok]))
        parts.append(self._assistant)
        answer_start = sum(len(p) for p in parts)
        parts += [self.codec.encode(sample.answer), self._eos]
        return np.concatenate(parts).astype(np.int32), answer_start

    def build(self, samples: list[synthetic.Sample]) -> dict:
        """One batch of ``len(samples) // samples_per_row`` rows; row r packs samples r*k .. r*k+k-1 as segments
        1..k (positions restart per segment, so packed samples never see each other)."""
        cfg = self.data_config
        k = cfg.samples_per_row
        if len(samples) % k:
            raise ValueError(f"{len(samples)} samples do not fill rows of DataConfig.samples_per_row={k}")
        b, s = len(samples) // k, cfg.seq_len
        batch = {key: np.zeros((b, s), np.int32) for key in ("input_ids", "positions", "segment_ids", "span_ids")}
        batch["input_ids"][:] = self.codec.pad_id
        batch["labels"] = np.full((b, s), IGNORE, np.int32)
        batch["encoder_inputs"] = {n: np.zeros((b * k * self.slots[n],) + self.shapes[n], np.float32)
                                   for n in self.slots}
        batch["feature_index"] = {n: np.full((b, s), -1, np.int32) for n in self.model_config.encoders}
        mrope = uses_mrope(self.model_config)
        if mrope:
            batch["rope_positions"] = np.zeros((b, s, 3), np.int32)
        # Native-resolution instances of the batch, in order: (modality, instance, row, first token, time interval).
        native_items = []
        for row in range(b):
            offset, span = 0, 0
            for seg in range(k):
                index = row * k + seg  # sample index within the batch: owns encoder rows index*K .. index*K+K-1
                sample = samples[index]
                instances = {n: [] for n in self.native}
                for name, data in sample.media:
                    if name in self.native:
                        instances[name].append(self.native_instance(name, data, index, sample.task))
                ids, answer_start = self.sample_tokens(
                    sample, {n: [self.processors[n].tokens(x) for x, _ in v] for n, v in instances.items()})
                n = len(ids)
                if offset + n > s:
                    raise ValueError(f"row {row}: packing {k} samples needs more than DataConfig.seq_len={s} "
                                     f"tokens (sample {index} ({sample.task}) has {n} tokens at offset {offset})")
                cols = slice(offset, offset + n)
                batch["input_ids"][row, cols] = ids
                batch["positions"][row, cols] = np.arange(n)
                batch["segment_ids"][row, cols] = seg + 1
                # Position t predicts token t + 1; only answer tokens (from answer_start on) are targets.
                tgt = np.arange(answer_start - 1, n - 1)
                batch["labels"][row, offset + tgt] = ids[tgt + 1]
                used = {name: 0 for name in self.model_config.encoders}
                rope_spans = []
                for name, data in sample.media:
                    if name not in self.model_config.encoders:
                        raise ValueError(f"sample {index} ({sample.task}) needs a {name!r} encoder the model lacks")
                    j = used[name]
                    if name in self.native:
                        used[name] += 1
                        inst, interval = instances[name][j]
                        n_tok = self.processors[name].tokens(inst)
                        where = np.flatnonzero(ids == self.placeholder_ids[name])
                        run = where[sum(self.processors[name].tokens(x) for x, _ in instances[name][:j]):][:n_tok]
                        span += 1
                        batch["span_ids"][row, offset + run] = span
                        native_items.append((name, inst, row, offset + run[0], n_tok, index))
                        rope_spans.append((int(run[0]), inst.grid_thw, interval))
                        continue
                    if j >= self.slots[name]:
                        raise ValueError(f"sample {index} has more than {self.slots[name]} {name!r} items")
                    used[name] += 1
                    slot = index * self.slots[name] + j
                    batch["encoder_inputs"][name][slot] = data
                    # The j-th run of this modality's placeholder in the sample belongs to item j.
                    where = np.flatnonzero(ids == self.placeholder_ids[name])
                    run = offset + where[j * self.counts[name]:(j + 1) * self.counts[name]]
                    span += 1
                    batch["span_ids"][row, run] = span
                    batch["feature_index"][name][row, run] = slot * self.counts[name] + np.arange(self.counts[name])
                if mrope:  # fixed-size modalities' tokens count as text (consecutive, all three axes equal)
                    merge = self.model_config.encoders[self.native[0]].spatial_merge_size if self.native else 1
                    batch["rope_positions"][row, cols] = native_pack.rope_positions(n, rope_spans, merge)
                offset += n
        for name in self.native:
            self._pack_native(batch, name, [it[1:] for it in native_items if it[0] == name])
        return batch

    def native_instance(self, name: str, data, index: int, task: str):
        """(the processor's NativeInstance, its M-RoPE time interval) for one image [H, W, C] or video [T, H, W, C];
        a ValueError from the processor (a video with no frames, ...) names the sample."""
        data, enc = np.asarray(data), self.model_config.encoders[name]
        try:  # synthetic clips are drawn at the tower's fps: the processor keeps every frame
            inst = (self.processors[name].video(data, video_fps=enc.fps) if data.ndim == 4
                    else self.processors[name].image(data))
        except ValueError as e:
            raise ValueError(f"sample {index} ({task}): {name!r} item of shape {data.shape}: {e}") from e
        return inst, time_interval(enc, inst, data.ndim == 4)

    def _pack_native(self, batch: dict, name: str, items: list) -> None:
        """Every instance of the batch packed into patch rows (native_pack.pack_instances, shared with the real-data
        loader); feature_index points each run at its features."""
        enc = self.model_config.encoders[name]
        packed = native_pack.pack_instances(
            [inst.patches for inst, *_ in items], [inst.grid_thw for inst, *_ in items], enc,
            names=[f"sample {it[-1]}: a {name!r} item" for it in items])
        for (inst, row, start, n_tok, _), fi in zip(items, packed.feature_index):
            batch["feature_index"][name][row, start:start + n_tok] = fi
        batch["encoder_inputs"][name] = packed.inputs
        self.last_pack[name] = {"patches": packed.used, "padding": packed.padding}


def check_placeholders(batch: dict, model_config) -> None:
    """Placeholder count == referenced feature count, per sample and modality (ValueError naming the sample)."""
    counts = feature_counts(model_config)
    for name, fidx in batch["feature_index"].items():
        if name not in counts:  # native resolution: mllm_jax.batch.check_batch checks each run against its grid
            continue
        pid = model_config.placeholder_ids[name]
        n_rows = batch["encoder_inputs"][name].shape[0]
        for row in range(batch["input_ids"].shape[0]):
            is_ph = batch["input_ids"][row] == pid
            if not np.array_equal(is_ph, fidx[row] >= 0):
                raise ValueError(f"sample {row}: {name!r} placeholders and feature_index disagree")
            if is_ph.sum() % counts[name]:
                raise ValueError(f"sample {row}: {is_ph.sum()} {name!r} placeholders is not a multiple of "
                                 f"{counts[name]} features per item")
            if (fidx[row] >= n_rows * counts[name]).any():
                raise ValueError(f"sample {row}: {name!r} feature_index beyond {n_rows * counts[name]} features")


class SyntheticBatches:
    """Deterministic stream of global batches; batch i holds samples i*B*k .. (i+1)*B*k-1 of the split's random
    stream (B rows of k = samples_per_row packed samples).

    Each yielded batch has a leading microbatch axis [M, B/M, ...]; each microbatch is a self-contained contract
    batch (its own encoder rows, feature_index local to it). ``state()``/``restore()`` are all a checkpoint needs.
    """

    def __init__(self, model_config, data_config, *, microbatches: int = 1, split: str = "train",
                 codec: TextCodec | None = None):
        if data_config.samples_per_row < 1:
            raise ValueError(f"DataConfig.samples_per_row must be >= 1; got {data_config.samples_per_row}")
        if data_config.batch_size % microbatches:
            raise ValueError(f"DataConfig.batch_size ({data_config.batch_size}) is not divisible by "
                             f"ParallelConfig.microbatches ({microbatches})")
        self.builder = BatchBuilder(model_config, data_config, codec)
        self.cfg = data_config
        self.microbatches = microbatches
        self.split = split
        self.index = 0
        self.tasks, self.probs = _mixture_tasks(data_config.mixture, "mixture", model_config)
        # Curriculum: samples before warmup_samples (train split) draw their task from mixture_warmup.
        self.warmup_samples, self.warm_tasks, self.warm_probs = 0, self.tasks, self.probs
        if data_config.mixture_warmup_steps or data_config.mixture_warmup:
            if data_config.mixture_warmup_steps <= 0 or not data_config.mixture_warmup:
                raise ValueError(f"DataConfig.mixture_warmup ({data_config.mixture_warmup}) and mixture_warmup_steps "
                                 f"({data_config.mixture_warmup_steps}) go together: give both or neither")
            if data_config.epoch_samples:
                raise ValueError(f"DataConfig.mixture_warmup with epoch_samples ({data_config.epoch_samples}): a "
                                 f"repeated sample would change its task between epochs")
            self.warm_tasks, self.warm_probs = _mixture_tasks(data_config.mixture_warmup, "mixture_warmup",
                                                              model_config)
            if split == "train":
                self.warmup_samples = (data_config.mixture_warmup_steps * data_config.batch_size
                                       * data_config.samples_per_row)
        tasks = set(self.tasks) | set(self.warm_tasks)
        encs = model_config.encoders
        self._native = "vision" in encs and model_config.is_native_resolution("vision")
        if "video" in tasks and not self._native:
            raise ValueError("DataConfig.mixture asks for 'video' samples, which need a native-resolution 'vision' "
                             "encoder (NativeVisionConfig)")
        self._image_size = encs["vision"].image_size if "vision" in encs and not self._native else 0
        # Native images/videos are multiples of patch_size * merge_size pixels a side (the processor keeps them).
        self._factor = encs["vision"].patch_size * encs["vision"].spatial_merge_size if self._native else 0
        self._audio = (encs["audio"].num_frames, encs["audio"].n_mels) if "audio" in encs else (0, 0)

    def sample_index(self, index: int) -> int:
        """The sample the stream's ``index``-th position holds: train streams repeat every
        ``DataConfig.epoch_samples`` samples (epochs) when that is set; held-out streams never repeat."""
        epoch = self.cfg.epoch_samples
        return index % epoch if epoch and self.split == "train" else index

    def sample(self, index: int) -> synthetic.Sample:
        rng = synthetic.sample_rng(self.cfg.seed, self.split, self.sample_index(index))
        tasks, probs = (self.warm_tasks, self.warm_probs) if index < self.warmup_samples else (self.tasks, self.probs)
        task = tasks[rng.choice(len(tasks), p=probs)]
        if self._native and task in ("image", "video"):
            return synthetic.make_native_sample(rng, task, factor=self._factor)
        return synthetic.make_sample(rng, task, image_size=self._image_size, n_frames=self._audio[0],
                                     n_mels=self._audio[1], audio_fmax=self.cfg.audio_fmax)

    def batch_at(self, step: int) -> dict:
        b = self.cfg.batch_size * self.cfg.samples_per_row  # samples per global batch
        mb = b // self.microbatches
        parts = [self.builder.build([self.sample(step * b + m * mb + i) for i in range(mb)])
                 for m in range(self.microbatches)]
        return stack_microbatches(parts, self.builder.native)

    def instance_keys(self, step: int, rows: slice | None = None) -> dict:
        """{modality: object array [M, N]} of stable ids of the encoder rows of ``batch_at(step)`` (rows ``rows`` of
        each microbatch, as ``local_synthetic_batch`` builds them): "<split>:<seed>:<sample>:<item>" for
        the item-th instance of a sample, the same in every epoch and run (unused rows get ids too: which rows are
        used is feature_index's to say). What a feature cache (mllm_jax.data.encoder_cache) keys its entries by."""
        k, m, cfg = self.cfg.samples_per_row, self.microbatches, self.cfg
        mb_rows = cfg.batch_size // m
        rows = rows or slice(0, mb_rows)
        first = [step * cfg.batch_size * k + micro * mb_rows * k + rows.start * k for micro in range(m)]
        n_samples = (rows.stop - rows.start) * k
        out = {}
        for name, slots in self.builder.slots.items():
            keys = np.empty((m, n_samples * slots), object)
            for micro in range(m):
                for s in range(n_samples * slots):
                    keys[micro, s] = (f"{self.split}:{cfg.seed}:{self.sample_index(first[micro] + s // slots)}:"
                                      f"{s % slots}")
            out[name] = keys
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batch_at(self.index)
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"index": int(self.index), "seed": int(self.cfg.seed), "split": self.split}

    def restore(self, state: dict) -> None:
        if state.get("seed") != self.cfg.seed or state.get("split") != self.split:
            raise ValueError(f"data iterator state {state} is for another stream than seed={self.cfg.seed}, "
                             f"split={self.split!r}")
        self.index = int(state["index"])


def _mixture_tasks(mixture: dict, name: str, model_config) -> tuple[list, np.ndarray]:
    """(tasks, probabilities) of a DataConfig mixture (``name``: its field), the tasks sorted by name."""
    tasks, weights = [], []
    for task, w in sorted(mixture.items()):
        if task not in synthetic.TASKS:
            raise ValueError(f"DataConfig.{name} has unknown task {task!r}; known: {synthetic.TASKS}")
        modality = synthetic.TASK_MODALITY[task]
        if w > 0 and modality is not None and modality not in model_config.encoders:
            raise ValueError(f"DataConfig.{name} asks for {task!r} samples but the model has no {modality!r} "
                             f"encoder (encoders: {tuple(model_config.encoders)})")
        if w > 0:
            tasks.append(task)
            weights.append(float(w))
    if not tasks:
        raise ValueError(f"DataConfig.{name} has no task with positive weight: {mixture}")
    return tasks, np.asarray(weights) / np.sum(weights)


def stack_microbatches(parts: list[dict], native: tuple = ()) -> dict:
    """Microbatches stacked on a leading axis; native-resolution patch rows first grown to the largest microbatch's
    row bucket (empty rows at the end: feature_index is unchanged)."""
    for name in native:
        rows = max(p["encoder_inputs"][name]["segment_ids"].shape[0] for p in parts)
        for p in parts:
            p["encoder_inputs"][name] = native_pack.pad_rows(p["encoder_inputs"][name], rows)
    return stack(parts)


def stack(batches: list[dict]) -> dict:
    """Stack equal-structured batches on a new leading axis."""
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def unstack_first(batch: dict) -> dict:
    import jax

    return jax.tree.map(lambda x: x[0], batch)


def local_synthetic_batch(data, step: int, rows: slice) -> dict:
    """Rows ``rows`` of every microbatch of ``data.batch_at(step)`` (mllm_jax.data.SyntheticBatches), built from only
    the samples those rows hold: a host makes its share of the synthetic stream without making the rest.

    Encoder rows are laid out sample-major, so the rows' encoder inputs are one contiguous block and their
    ``feature_index`` (global indices into the microbatch's flattened features) is shifted by the block's start.
    """
    cfg = data.cfg
    k, m = cfg.samples_per_row, data.microbatches
    mb_rows = cfg.batch_size // m
    if not 0 <= rows.start < rows.stop <= mb_rows or rows.step not in (None, 1):
        raise ValueError(f"rows {rows} must be a contiguous slice of the {mb_rows} rows of a microbatch")
    per_batch, per_micro = cfg.batch_size * k, mb_rows * k
    counts = feature_counts(data.builder.model_config)
    if data.builder.native and (rows.start, rows.stop) != (0, mb_rows):
        raise ValueError(f"native-resolution modalities {data.builder.native} pack a microbatch's instances into "
                         f"patch rows shared by all its rows; building only rows {rows} of {mb_rows} (several hosts) "
                         f"is not supported")
    parts = []
    for micro in range(m):
        first = step * per_batch + micro * per_micro + rows.start * k
        part = data.builder.build([data.sample(first + i) for i in range((rows.stop - rows.start) * k)])
        for name, fidx in part["feature_index"].items():
            if name not in counts:
                continue
            shift = rows.start * k * data.builder.slots[name] * counts[name]
            part["feature_index"][name] = np.where(fidx >= 0, fidx + shift, fidx).astype(np.int32)
        parts.append(part)
    return stack_microbatches(parts, data.builder.native)
