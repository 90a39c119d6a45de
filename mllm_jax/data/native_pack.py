"""Native-resolution instances -> packed patch rows, and the M-RoPE positions of the text (docs/native_resolution.md).

Every image and video of a (micro)batch is packed first-fit into R rows of P patches (``plan_rows``): the row count R
comes from a small static set (``row_buckets``: 1, 2, 3, 4, 6, 8, 12, ...), so few shapes ever compile, and the
padding is counted (``PackedRows.padding``). Each instance starts at a multiple of ``merge_units`` (= merge_size**2)
so the projector's merge groups never straddle two instances; its projected features are then the contiguous range
``feature_base[i] .. feature_base[i] + n_i / merge_units - 1`` of the modality's features flattened to
[R * P / merge_units, D], and ``PackedRows.feature_index[i]`` is what the instance's placeholder run points at.

Patch order: HF's (merge-group major, raster over merged units) for Qwen2-VL; a tower with window layers
(Qwen2.5-VL) gets each instance window-major (``window_order``: HF's ``get_window_index`` order), so each attention
window is a contiguous run of the row and the kernels' block map computes only its tiles. The tower reads windows and
2-D rotary angles from each patch's ``grid`` coordinate, the merger's groups stay whole, and the run's feature_index
takes the merged units back to the tokens' raster order (``batch.token_units``): a gather the LLM does anyway, so the
permutation costs nothing on the device.

M-RoPE (``rope_positions``): Qwen2-VL's ``get_rope_index`` computed per packed sample from the sample's own token
layout, so packing (which sample sits next to which) and the context permutation (which moves the positions with their
tokens) leave every token's rotary angles unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mllm_jax.batch import token_units


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where each instance goes: rows of ``patches_per_row`` patches; instance i at (row[i], offset[i])."""

    rows: int  # R: the bucket's row count (>= rows used)
    patches_per_row: int  # P
    row: np.ndarray  # [N] int
    offset: np.ndarray  # [N] int, a multiple of merge_units
    used: int  # patches holding an instance (the rest of R * P is padding)

    @property
    def padding(self) -> int:
        return self.rows * self.patches_per_row - self.used


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """The static row counts a packed batch may take: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x them, at
    most ~1.5x padding) up to the first that holds ``max_rows``."""
    out, c = [], 1
    while True:
        for r in (c, c * 3 // 2) if c >= 2 else (c,):
            if not out or r > out[-1]:
                out.append(r)
            if r >= max_rows:
                return tuple(out)
        c *= 2


def plan_rows(patch_counts, patches_per_row: int, merge_units: int, buckets) -> PackPlan:
    """First-fit decreasing of instances of ``patch_counts`` patches into rows of ``patches_per_row``; the smallest row
    count of ``buckets`` that holds the rows used. ValueError naming the instance or the counts when nothing fits."""
    counts = np.asarray(patch_counts, np.int64).reshape(-1)
    p = int(patches_per_row)
    if p <= 0 or p % merge_units:
        raise ValueError(f"patches_per_row ({p}) must be a positive multiple of merge_size**2 ({merge_units})")
    for i, n in enumerate(counts):
        if n <= 0 or n % merge_units:
            raise ValueError(f"instance {i} has {int(n)} patches: it must be a positive multiple of merge_size**2 "
                             f"({merge_units}) (a grid whose h and w are multiples of merge_size)")
        if n > p:
            raise ValueError(f"instance {i} has {int(n)} patches, more than a packed row holds "
                             f"(NativeVisionConfig.patches_per_row = {p}): raise it or lower max_pixels")
    row = np.zeros(len(counts), np.int64)
    offset = np.zeros(len(counts), np.int64)
    fill: list[int] = []  # patches used per row
    # Largest first, ties in input order: deterministic, and the big instances never end up alone in fresh rows.
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        n = int(counts[i])
        r = next((r for r, f in enumerate(fill) if f + n <= p), len(fill))
        if r == len(fill):
            fill.append(0)
        row[i], offset[i] = r, fill[r]
        fill[r] += n
    need = max(len(fill), 1)
    fits = sorted(b for b in buckets if b >= need)
    if not fits:
        raise ValueError(f"{len(counts)} instances of {[int(c) for c in counts]} patches need {need} rows of {p} "
                         f"patches; the row buckets go up to {max(buckets, default=0)}")
    return PackPlan(rows=int(fits[0]), patches_per_row=p, row=row, offset=offset, used=int(counts.sum()))


@dataclasses.dataclass
class PackedRows:
    """One modality's packed encoder input (the ``encoder_inputs[name]`` dict of docs/native_resolution.md) and where
    each instance's projected features start."""

    inputs: dict  # {"patches" [R, P, K] float32, "grid" [R, P, 3] int32, "segment_ids" [R, P] int32}
    feature_base: np.ndarray  # [N] int: instance i's first feature in the flattened [R * P / merge_units, D]
    used: int  # patches holding an instance
    padding: int  # padded patches (R * P - used)
    # instance i's placeholder run's feature_index: its n_i / merge_units features in token (raster) order
    feature_index: list = dataclasses.field(default_factory=list)


def window_order(coords_N3, merge_size: int, window: int) -> np.ndarray:
    """[N] int: the order that lays one instance's patches (``coords_N3``, each patch's (t, h, w), in any order) out
    window-major, as HF Qwen2.5-VL's ``get_window_index`` permutes them: per temporal index, the windows of ``window``
    merged units square (anchored at the top-left, partial at the bottom and right) in raster order, each window's
    merged units in raster order, each unit's merge_size**2 patches in (row, column) order. ``window`` = 0: HF's
    processor order (merge-group major)."""
    c = np.asarray(coords_N3, np.int64)
    m = merge_size
    t, row, col = c[:, 0], c[:, 1] // m, c[:, 2] // m
    keys = [c[:, 2] % m, c[:, 1] % m, col, row]
    if window:
        keys += [col // window, row // window]
    return np.lexsort(keys + [t])


def pack(patches, coords, plan: PackPlan, merge_units: int, *, rows: int | None = None,
         window: int = 0) -> PackedRows:
    """Instances (``patches[i]`` [n_i, K] in HF's patch order, ``coords[i]`` [n_i, 3] each patch's (t, h, w)) laid
    out by ``plan``; ``rows`` > plan.rows pads with empty rows (several microbatches of one batch share a shape).
    ``window`` (merged units, ``native_vision.window_units``; 0: none): each instance laid out window-major
    (``window_order``); ``feature_index[i]`` then reads its units back in token order."""
    if len(patches) != len(plan.row) or len(coords) != len(plan.row):
        raise ValueError(f"{len(patches)} patch arrays and {len(coords)} coordinate arrays for a plan of "
                         f"{len(plan.row)} instances")
    r_total = plan.rows if rows is None else int(rows)
    if r_total < plan.rows:
        raise ValueError(f"rows={r_total} is fewer than the plan's {plan.rows}")
    p = plan.patches_per_row
    k = int(np.shape(patches[0])[-1]) if len(patches) else 0
    out = {"patches": np.zeros((r_total, p, k), np.float32), "grid": np.zeros((r_total, p, 3), np.int32),
           "segment_ids": np.zeros((r_total, p), np.int32)}
    seg_in_row = np.zeros(r_total, np.int64)
    m = math.isqrt(merge_units)
    base = ((plan.row * p + plan.offset) // merge_units).astype(np.int64)
    feature_index = [None] * len(plan.row)
    # Segments numbered 1, 2, ... along each row in offset order (the mask and windows only compare them).
    for i in sorted(range(len(plan.row)), key=lambda i: (plan.row[i], plan.offset[i])):
        x, c = np.asarray(patches[i], np.float32), np.asarray(coords[i], np.int32)
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != k or c.shape != (n, 3):
            raise ValueError(f"instance {i}: patches {x.shape} must be [n, {k}] and coordinates {c.shape} [n, 3]")
        if window:
            order = window_order(c, m, window)
            x, c = x[order], c[order]
        r, o = int(plan.row[i]), int(plan.offset[i])
        seg_in_row[r] += 1
        out["patches"][r, o:o + n] = x
        out["grid"][r, o:o + n] = c
        out["segment_ids"][r, o:o + n] = seg_in_row[r]
        feature_index[i] = base[i] + token_units(c, m)
    return PackedRows(out, base, plan.used, r_total * p - plan.used, feature_index)


def pad_rows(inputs: dict, rows: int) -> dict:
    """A packed modality input grown to ``rows`` rows with empty (segment 0) rows; feature bases are unchanged."""
    r = inputs["segment_ids"].shape[0]
    if rows < r:
        raise ValueError(f"cannot shrink {r} packed rows to {rows}")
    return {k: np.concatenate([v, np.zeros((rows - r,) + v.shape[1:], v.dtype)]) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------------- M-RoPE


def rope_positions(num_tokens: int, spans, merge_size: int) -> np.ndarray:
    """[num_tokens, 3] int32 (temporal, height, width) M-RoPE positions of one sample in its causal order
    (transformers' Qwen2-VL / Qwen2.5-VL ``get_rope_index``).

    ``spans``: one (start, grid_thw, time_interval) per instance, in token order: its placeholder run starts at token
    ``start`` and has t * (h / m) * (w / m) tokens for the patch grid (t, h, w); ``time_interval`` is the temporal
    position step (1 for images and for Qwen2-VL; Qwen2.5-VL videos: tokens_per_second * second_per_grid_t).
    Text positions count up by one (all three equal); an instance's tokens get (start_pos + t * interval,
    start_pos + row, start_pos + col); the text after it continues from start_pos + max(h, w) / m (transformers'
    rule, which leaves a video's temporal extent out)."""
    out = np.zeros((num_tokens, 3), np.int64)
    cur, pos = 0, 0  # next token, next text position
    for start, (t, h, w), interval in sorted(spans, key=lambda s: s[0]):
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of merge_size ({merge_size})")
        lh, lw = h // merge_size, w // merge_size
        n = t * lh * lw
        if start < cur or start + n > num_tokens:
            raise ValueError(f"instance of grid {(t, h, w)} ({n} tokens) at token {start} overlaps another or runs "
                             f"past the sample's {num_tokens} tokens")
        out[cur:start] = pos + np.arange(start - cur)[:, None]
        pos += start - cur
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        out[start:start + n, 0] = pos + (tt.reshape(-1) * interval).astype(np.int64)
        out[start:start + n, 1] = pos + hh.reshape(-1)
        out[start:start + n, 2] = pos + ww.reshape(-1)
        pos += max(lh, lw)
        cur = start + n
    out[cur:] = pos + np.arange(num_tokens - cur)[:, None]
    return out.astype(np.int32)


# ------------------------------------------------------------------------ shared by synthetic and real-data batches


def time_interval(enc, instance, is_video: bool) -> float:
    """The M-RoPE temporal step of an instance: 1 for images and Qwen2-VL; a Qwen2.5-VL video's
    tokens_per_second * second_per_grid_t (``instance.seconds_per_grid``, the processor's, as transformers'
    Qwen2.5-VL). ``instance``: anything with ``seconds_per_grid`` (a NativeInstance, a planned dataset instance)."""
    if not is_video or not enc.tokens_per_second:
        return 1.0
    return enc.tokens_per_second * instance.seconds_per_grid


def instance_tokens(grid_thw, merge_size: int) -> int:
    """The placeholder run of an instance of patch grid (t, h, w): t * h * w / merge_size**2 LLM tokens."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of merge_size ({merge_size})")
    return t * h * w // merge_size**2


def image_grid(processor, height: int, width: int) -> tuple[int, int, int]:
    """The patch grid (1, h, w) ``processor.image`` gives an image of height x width pixels, from its size alone
    (the processor's smart_resize): what a loader plans with before any pixel is decoded. ValueError as
    smart_resize's (an aspect ratio above 200, an empty image)."""
    from mllm_jax.data.processor.native_vision import smart_resize

    h, w = smart_resize(int(height), int(width), processor.factor, processor.min_pixels, processor.max_pixels)
    return 1, h // processor.patch_size, w // processor.patch_size


def video_plan(processor, num_frames: int, height: int, width: int, video_fps: float | None):
    """(frame indices kept, patch grid (t, h, w), seconds_per_grid) of ``processor.video(frames, video_fps=...)``
    on a clip of ``num_frames`` frames of height x width, from the header alone: the kept frames through the
    processor with ``video_fps=None`` give the same patches (what a loader decodes, and only those frames).
    ValueError for a clip with no frames or too few to sample."""
    from mllm_jax.data.processor.native_vision import sample_frames, smart_resize

    total = int(num_frames)
    if total <= 0:
        raise ValueError(f"video has no frames (num_frames={total})")
    if video_fps is None:
        keep, spg = np.arange(total), processor.temporal_patch_size / 24.0  # HF's metadata default (processor.video)
    else:
        keep = sample_frames(total, video_fps, processor.fps, temporal_patch_size=processor.temporal_patch_size,
                             min_frames=processor.min_frames, max_frames=processor.max_frames)
        spg = processor.temporal_patch_size / (len(keep) / total * float(video_fps))
    h, w = smart_resize(int(height), int(width), processor.factor, processor.video_min_pixels,
                        processor.video_max_pixels)
    t = -(-len(keep) // processor.temporal_patch_size)
    return keep, (t, h // processor.patch_size, w // processor.patch_size), spg


def pack_instances(patches, grids, enc, *, rows: int | None = None, buckets=None, names=None,
                   reserve=()) -> PackedRows:
    """One microbatch's (or one data rank's) instances packed into patch rows of ``enc.patches_per_row``:
    ``patches[i]`` [n_i, K] from the processor, ``grids[i]`` its (t, h, w). The row count is the smallest of
    ``buckets`` (default ``row_buckets(len(patches))``) that holds them, grown to ``rows`` when given. An instance
    larger than a row is a ValueError naming it (``names[i]``, default its index). With no instance: empty rows of
    the right width. ``reserve``: patch counts of instances planned with them but absent (a sample dropped while
    decoding): the layout is the plan of all of them (the absent ones listed last), their places left empty, so what fit when planned still fits
    (first-fit decreasing is not guaranteed monotone: a
    re-plan of fewer items need not keep the planned row count). Each instance in its tower's patch order
    (window-major with window layers: ``pack``); its run's feature_index is ``feature_index[i]``."""
    from mllm_jax.data.processor.native_vision import patch_grid
    from mllm_jax.native_vision import window_units

    p = enc.patches_per_row
    names = names or [f"instance {i}" for i in range(len(patches))]
    for name, x, g in zip(names, patches, grids):
        if len(x) > p:
            raise ValueError(f"{name} of grid (t, h, w) = {tuple(int(v) for v in g)} has {len(x)} patches, more "
                             f"than a packed row holds (NativeVisionConfig.patches_per_row = {p}): raise it or lower max_pixels")
    reserve = [int(n) for n in reserve]
    buckets = buckets if buckets is not None else row_buckets(max(len(patches) + len(reserve), 1))
    plan = plan_rows([len(x) for x in patches] + reserve, p, enc.merge_units, buckets)
    k = len(patches)
    plan = dataclasses.replace(plan, row=plan.row[:k], offset=plan.offset[:k], used=plan.used - sum(reserve))
    packed = pack(list(patches), [patch_grid(g, enc.spatial_merge_size) for g in grids], plan, enc.merge_units,
                  rows=max(plan.rows, rows or 0), window=window_units(enc))
    if not len(patches):
        packed.inputs["patches"] = np.zeros(packed.inputs["segment_ids"].shape + (enc.patch_dim,), np.float32)
    return packed


def rows_needed(patch_counts, enc) -> int:
    """Patch rows the first-fit of ``pack_instances`` uses for instances of ``patch_counts`` patches (0 for none);
    ValueError naming the instance for one larger than a row."""
    counts = list(patch_counts)
    if not counts:
        return 0
    plan = plan_rows(counts, enc.patches_per_row, enc.merge_units, (len(counts),))
    return int(max(plan.row) + 1)
