"""Sequence packing and static bucket shapes.

Several samples share a row: segment ids 1, 2, ... per sample (0 = padding), positions restarting at 0 per sample,
span ids 1, 2, ... per encoder instance in the row. Labels are shifted per sample before packing, so the last token
of a sample never predicts the first token of the next one; the mask rule (kernels.meta) keeps segments apart.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data import native_pack
from mllm_jax.data.datasets.sample import IGNORE, Sample


def pack_rows(lengths, rows: int, seq_len: int):
    """First-fit decreasing of samples (by token count) into ``rows`` rows of ``seq_len`` tokens.

    Returns, per row, the sample indices in ascending order, or None when they do not fit."""
    fill = [0] * rows
    plan = [[] for _ in range(rows)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r in range(rows):
            if fill[r] + lengths[i] <= seq_len:
                fill[r] += lengths[i]
                plan[r].append(i)
                break
        else:
            return None
    return [sorted(p) for p in plan]


def choose_bucket(buckets, fits) -> int | None:
    """The smallest bucket value for which ``fits(value)`` holds, or None."""
    for b in sorted(int(x) for x in buckets):
        if fits(b):
            return b
    return None


class PackedBatchWriter:
    """Writes packed microbatches into one host batch with a leading microbatch axis (like mllm_jax.data):

    input_ids/labels/positions/segment_ids/span_ids [M, D_local * R, S]; encoder_inputs[name] [M, D_local * N, ...];
    feature_index[name] [M, D_local * R, S]. Data rank r (global) owns rows r*R .. r*R+R-1 and encoder rows
    r*N .. r*N+N-1 of each global microbatch, and feature_index holds global indices (r*N + n) * T + k into the
    microbatch's projected features [D * N * T, dim], so the host blocks of all processes concatenate along axis 1
    into the global microbatch.

    A native-resolution modality (``native[name]``: its NativeVisionConfig, docs/native_resolution.md): ``slots[name]``
    is the patch rows R per data rank and microbatch (one bucket for the whole global batch), encoder_inputs[name] the
    dict {patches [M, D_local * R, P, K], grid, segment_ids} of each rank's instances packed by
    ``native_pack.pack_instances``, and feature_index the global index ((r * R + row) * P + offset) / merge_size**2 +
    the token's merged unit (``PackedRows.feature_index``: window-major packing reorders them) into the microbatch's
    merged features [D * R * P / merge_size**2, dim]. ``mrope_merge``: write ``rope_positions``
    [M, D_local * R, S, 3] per sample (native_pack.rope_positions; the merge size of the native tower, 1 without one).
    """

    def __init__(self, *, microbatches: int, local_ranks: int, first_rank: int, rows: int, seq_len: int,
                 slots: dict, shapes: dict, feature_counts: dict, placeholder_ids: dict, pad_id: int = 0,
                 native: dict | None = None, mrope_merge: int | None = None):
        m, b, s = microbatches, local_ranks * rows, seq_len
        self.rows, self.seq_len, self.first_rank = rows, seq_len, first_rank
        self.slots, self.feature_counts, self.placeholder_ids = slots, feature_counts, placeholder_ids
        self.native, self.mrope_merge = dict(native or {}), mrope_merge
        self.batch = {k: np.zeros((m, b, s), np.int32) for k in ("input_ids", "positions", "segment_ids", "span_ids")}
        self.batch["input_ids"][:] = pad_id
        self.batch["labels"] = np.full((m, b, s), IGNORE, np.int32)
        if mrope_merge is not None:
            self.batch["rope_positions"] = np.zeros((m, b, s, 3), np.int32)
        self.batch["encoder_inputs"] = {n: np.zeros((m, local_ranks * slots[n]) + tuple(shapes[n]), np.float32)
                                        for n in slots if n not in self.native}
        for n, enc in self.native.items():
            self.batch["encoder_inputs"][n] = {
                "patches": np.zeros((m, local_ranks * slots[n], enc.patches_per_row, enc.patch_dim), np.float32),
                "grid": np.zeros((m, local_ranks * slots[n], enc.patches_per_row, 3), np.int32),
                "segment_ids": np.zeros((m, local_ranks * slots[n], enc.patches_per_row), np.int32)}
        self.patches_used = 0  # native patch slots holding an instance, over the batch
        self.batch["feature_index"] = {n: np.full((m, b, s), -1, np.int32) for n in slots}
        # Beside the batch (object arrays do not go to devices): the id of each encoder row, like encoder_inputs'
        # instance axes [M, D_local * N] ("" for an empty slot), for a frozen encoder's feature cache.
        # (A native modality's rows are patch rows, shared by instances: their keys stay "".)
        self.instance_keys = {n: np.full((m, local_ranks * slots[n]), "", object) for n in slots}

    def put(self, microbatch: int, local_rank: int, row_plan, dropped=()) -> None:
        """row_plan: per row, the Samples packed in it (None entries, dropped samples, are left as padding).
        ``dropped``: the PreparedSamples of those None entries: their native instances keep their planned patch
        slots (empty), so the rest are laid out as planned."""
        if len(row_plan) > self.rows:
            raise ValueError(f"row plan has {len(row_plan)} rows; the bucket has {self.rows}")
        bt, m = self.batch, microbatch
        used = {n: 0 for n in self.slots}
        global_rank = self.first_rank + local_rank
        native_items = {n: [] for n in self.native}  # (instance, processed, row, first token, sample id)
        for r, samples in enumerate(row_plan):
            row = local_rank * self.rows + r
            cursor, segment, span = 0, 0, 0
            for sample in samples:
                if sample is None:
                    continue
                p = sample.prepared
                n_tok = p.num_tokens
                if cursor + n_tok > self.seq_len:
                    raise ValueError(f"sample {p.sample_id!r} ({n_tok} tokens) overflows row {r} of length "
                                     f"{self.seq_len} at offset {cursor}")
                segment += 1
                sl = slice(cursor, cursor + n_tok)
                bt["input_ids"][m, row, sl] = p.input_ids
                bt["labels"][m, row, sl] = p.labels()
                bt["positions"][m, row, sl] = np.arange(n_tok)
                bt["segment_ids"][m, row, sl] = segment
                keys = sample.instance_keys or ("",) * len(p.instances)
                if len(keys) != len(p.instances):
                    raise ValueError(f"sample {p.sample_id!r}: {len(keys)} instance keys for {len(p.instances)} "
                                     f"instances")
                rope_spans = []
                for inst, data, key in zip(p.instances, sample.encoder_inputs, keys):
                    if not np.all(p.input_ids[inst.start:inst.start + inst.length] == self.placeholder_ids[
                            inst.modality]):
                        raise ValueError(f"sample {p.sample_id!r}: {inst.modality!r} run at {inst.start} is not "
                                         f"placeholders")
                    if inst.modality in self.native:
                        enc = self.native[inst.modality]
                        if tuple(data.grid_thw) != tuple(inst.grid) or inst.length != native_pack.instance_tokens(
                                inst.grid, enc.spatial_merge_size):
                            raise ValueError(f"sample {p.sample_id!r}: {inst.modality!r} instance {inst.media} has "
                                             f"grid {tuple(data.grid_thw)}, its run {inst.length} tokens for the "
                                             f"planned grid {inst.grid}")
                        span += 1
                        bt["span_ids"][m, row, cursor + inst.start:cursor + inst.start + inst.length] = span
                        native_items[inst.modality].append((inst, data, row, cursor + inst.start, p.sample_id))
                        rope_spans.append((inst.start, tuple(inst.grid),
                                           native_pack.time_interval(enc, data, inst.video)))
                        continue
                    name, k = inst.modality, used[inst.modality]
                    if k >= self.slots[name]:
                        raise ValueError(f"microbatch {m} rank {global_rank}: more than {self.slots[name]} "
                                         f"{name!r} instances (sample {p.sample_id!r})")
                    used[name] += 1
                    span += 1
                    run = slice(cursor + inst.start, cursor + inst.start + inst.length)
                    bt["span_ids"][m, row, run] = span
                    bt["encoder_inputs"][name][m, local_rank * self.slots[name] + k] = data
                    self.instance_keys[name][m, local_rank * self.slots[name] + k] = key
                    t = self.feature_counts[name]
                    base = (global_rank * self.slots[name] + k) * t
                    bt["feature_index"][name][m, row, run] = base + np.arange(inst.length)
                if self.mrope_merge is not None:  # fixed-size modalities' tokens count as text
                    bt["rope_positions"][m, row, sl] = native_pack.rope_positions(n_tok, rope_spans, self.mrope_merge)
                cursor += n_tok
        for name, items in native_items.items():
            reserve = [int(np.prod(i.grid)) for p in dropped for i in p.instances if i.modality == name]
            self._put_native(m, local_rank, global_rank, name, items, reserve)

    def _put_native(self, m: int, local_rank: int, global_rank: int, name: str, items: list, reserve=()) -> None:
        """A rank's instances of a native modality packed into its R patch rows; their runs' feature_index."""
        enc, r = self.native[name], self.slots[name]
        try:
            packed = native_pack.pack_instances([x.patches for _, x, *_ in items], [x.grid_thw for _, x, *_ in items],
                                                enc, buckets=(r,), reserve=reserve,
                                                names=[f"sample {it[-1]!r}: {it[0].media}" for it in items])
        except ValueError as e:  # the plan guaranteed they fit: a mismatch here is a bug, never a silent overflow
            raise ValueError(f"microbatch {m} rank {global_rank}: {name!r} instances do not fit the planned {r} patch "
                             f"rows: {e}") from e
        rows = slice(local_rank * r, (local_rank + 1) * r)
        for key, v in packed.inputs.items():
            self.batch["encoder_inputs"][name][key][m, rows] = v
        self.patches_used += packed.used
        first = global_rank * r * enc.patches_per_row // enc.merge_units  # this rank's first merged feature
        for (inst, _, row, start, _), fi in zip(items, packed.feature_index):
            self.batch["feature_index"][name][m, row, start:start + inst.length] = first + fi
