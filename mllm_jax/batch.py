"""Host-side (numpy) validation of a batch against a ModelConfig, before anything is traced (docs/contracts.md)."""

from __future__ import annotations

import numpy as np

from mllm_jax.config import AudioConfig, ModelConfig, NativeVisionConfig, VisionConfig

META_KEYS = ("labels", "positions", "segment_ids", "span_ids")
# A native-resolution modality's encoder input: packed patch rows (docs/native_resolution.md).
NATIVE_KEYS = ("patches", "grid", "segment_ids")
# The label of a token that is not predicted (prompt, placeholders, padding): the loss skips it.
IGNORE = -100


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def check_encoder_input(name: str, ecfg, x) -> int:
    """Shape check of one modality's encoder input; returns N (instances)."""
    s = _shape(x)
    if isinstance(ecfg, VisionConfig):
        want = (ecfg.image_size, ecfg.image_size, ecfg.num_channels)
        if len(s) != 4 or s[3] != ecfg.num_channels:
            raise ValueError(f"encoder_inputs[{name!r}] must be NHWC [N, H, W, {ecfg.num_channels}]; got shape {s}")
        if s[1] % ecfg.patch_size or s[2] % ecfg.patch_size:
            raise ValueError(f"encoder_inputs[{name!r}]: pixels {s[1]}x{s[2]} do not fit the patch grid of "
                             f"patch_size {ecfg.patch_size}")
        if s[1:] != want:
            raise ValueError(f"encoder_inputs[{name!r}]: images must be {want[0]}x{want[1]}x{want[2]}; got {s[1:]}")
    elif isinstance(ecfg, AudioConfig):
        if len(s) != 3 or s[2] != ecfg.n_mels:
            raise ValueError(f"encoder_inputs[{name!r}] must be log-mel [N, T, n_mels={ecfg.n_mels}]; got shape {s}")
        if s[1] != ecfg.num_frames:
            raise ValueError(f"encoder_inputs[{name!r}] must have T = {ecfg.num_frames} frames; got {s[1]}")
    return s[0]


def check_native_input(name: str, ecfg: NativeVisionConfig, x) -> list:
    """Shape and layout check of a packed native-resolution input; returns its instances as (row, start, patches,
    (t, h, w), token_units) in row-major order. Each instance: a run of one segment id starting at a multiple of
    merge_size**2, its ``grid`` coordinates a full (t, h, w) patch grid with h and w multiples of merge_size, each
    merge_size**2 consecutive patches one merged unit's patches in (row, column) order (what the patch merger
    concatenates); the units themselves may come in any order (Qwen2.5-VL's packing is window-major)."""
    if not isinstance(x, dict) or set(x) != set(NATIVE_KEYS):
        got = sorted(x) if isinstance(x, dict) else f"an array of shape {_shape(x)}"
        raise ValueError(f"encoder_inputs[{name!r}] (native resolution) must be a dict with keys {NATIVE_KEYS}; got "
                         f"{got}")
    ps, gs, ss = _shape(x["patches"]), _shape(x["grid"]), _shape(x["segment_ids"])
    if len(ss) != 2 or ps != ss + (ecfg.patch_dim,) or gs != ss + (3,):
        raise ValueError(f"encoder_inputs[{name!r}]: patches {ps}, grid {gs}, segment_ids {ss} must be [R, P, "
                         f"{ecfg.patch_dim}] (patch_dim), [R, P, 3], [R, P]")
    m2, m = ecfg.merge_units, ecfg.spatial_merge_size
    if ss[1] % m2:
        raise ValueError(f"encoder_inputs[{name!r}]: {ss[1]} patches per row is not a multiple of merge_size**2 = {m2}")
    seg, grid = np.asarray(x["segment_ids"]), np.asarray(x["grid"])
    out = []
    for r in range(ss[0]):
        s = seg[r]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], s, [0]])) != 0)
        ids_seen = set()
        for a, b in zip(edges[:-1], edges[1:]):
            if s[a] == 0:
                continue
            if s[a] < 0 or int(s[a]) in ids_seen:
                raise ValueError(f"encoder_inputs[{name!r}] row {r}: segment id {int(s[a])} at patch {a} is negative "
                                 f"or not contiguous (one run per instance)")
            ids_seen.add(int(s[a]))
            n = int(b - a)
            if a % m2 or n % m2:
                raise ValueError(f"encoder_inputs[{name!r}] row {r}: the instance at patch {a} ({n} patches) must "
                                 f"start at and span a multiple of merge_size**2 = {m2}")
            g = grid[r, a:b]
            thw = tuple(int(v) + 1 for v in g.max(axis=0))
            if g.min() < 0 or thw[0] * thw[1] * thw[2] != n or len(np.unique(g, axis=0)) != n or thw[1] % m \
                    or thw[2] % m:
                raise ValueError(f"encoder_inputs[{name!r}] row {r}: the grid of the instance at patch {a} is not a "
                                 f"full (t, h, w) grid of {n} patches with h, w multiples of {m} (its extent is "
                                 f"{thw})")
            groups = g.reshape(-1, m2, 3)
            corner = groups[:, :1] // [1, m, m] * [1, m, m]
            bad = np.flatnonzero((groups != corner + _merge_offsets(m)).any(axis=(1, 2)))
            if len(bad):
                j = int(bad[0])
                raise ValueError(f"encoder_inputs[{name!r}] row {r}: the instance at patch {a} has at patch "
                                 f"{a + j * m2} the grid {groups[j].tolist()}, not one merged unit's {m}x{m} patches "
                                 f"in (row, column) order (the patch merger concatenates each {m2} consecutive "
                                 f"patches)")
            out.append((r, int(a), n, thw, token_units(g, m)))
    return out


def _merge_offsets(m: int) -> np.ndarray:
    """[m*m, 3]: the (t, h, w) offsets of a merged unit's patches from its corner, in the merger's order."""
    dh, dw = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    return np.stack([np.zeros(m * m, np.int64), dh.reshape(-1), dw.reshape(-1)], -1)


def token_units(grid_N3, merge_size: int) -> np.ndarray:
    """[N / merge_size**2] int: for each LLM token of one packed native instance, in its placeholder run's order
    (raster over (t, h / m, w / m), HF's), the merged unit of the instance (a group of merge_size**2 consecutive
    patches of ``grid_N3``, the instance's packed grid) that the token reads. Its run's feature_index is the
    instance's first feature + this: the packing may lay the units out in any order (Qwen2.5-VL: window-major,
    data.native_pack.window_order), the tokens still read them in raster order."""
    g = np.asarray(grid_N3)[::merge_size**2]
    return np.lexsort((g[:, 2] // merge_size, g[:, 1] // merge_size, g[:, 0]))


def check_native_alignment(name: str, ecfg: NativeVisionConfig, instances: list, patches_per_row: int, ids, fi,
                           span, placeholders: tuple) -> None:
    """Each placeholder run (span) of modality ``name`` points at exactly one packed instance's projected features,
    all of them, each token its own merged unit (``token_units``): a grid whose token count differs from its run's
    length is an error, not a misalignment."""
    m2 = ecfg.merge_units
    bases = [((r * patches_per_row + a) // m2, n // m2) for r, a, n, *_ in instances]  # (first feature, tokens)
    nfeat = max([b + t for b, t in bases] + [0])
    owner = np.full(nfeat, -1, np.int64)
    for i, (b, t) in enumerate(bases):
        owner[b:b + t] = i
    total = owner.size
    is_ph = np.isin(ids, placeholders)
    for b in range(ids.shape[0]):
        for sp in np.unique(span[b][is_ph[b]]):
            run = np.flatnonzero(is_ph[b] & (span[b] == sp))
            f = fi[b, run]
            if sp == 0 or (f < 0).any() or (f >= total).any():
                raise ValueError(f"sample {b}: {name!r} placeholder run of span {int(sp)} has feature_index "
                                 f"{f.min()}..{f.max()} outside the {total} packed features, or no span id")
            inst = np.unique(owner[f])
            if len(inst) != 1 or inst[0] < 0:
                raise ValueError(f"sample {b}: {name!r} placeholder run of span {int(sp)} points at "
                                 f"{len(inst)} packed instances (or padding); one run must hold one instance")
            r, a, _, thw, units = instances[int(inst[0])]
            base, tokens = bases[int(inst[0])]
            if len(run) != tokens or not np.array_equal(f, base + units):
                raise ValueError(f"sample {b}: {name!r} placeholder run of span {int(sp)} has {len(run)} tokens but "
                                 f"its instance (row {r}, patch {a}) has grid (t, h, w) = {thw}, i.e. {tokens} "
                                 f"tokens after the {ecfg.spatial_merge_size}x{ecfg.spatial_merge_size} merge (or its "
                                 f"feature_index is not that instance's features in token order: batch.token_units)")


def check_batch(batch: dict, config: ModelConfig) -> None:
    """Raise ValueError naming what is wrong: shapes, vocabulary range, placeholder/feature counts per sample."""
    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S]; got shape {ids.shape}")
    for k in META_KEYS:
        if k not in batch:
            raise ValueError(f"batch has no {k!r}")
        if _shape(batch[k]) != ids.shape:
            raise ValueError(f"{k} shape {_shape(batch[k])} must equal input_ids shape {ids.shape}")
    vocab = config.llm.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = np.argwhere((ids < 0) | (ids >= vocab))[0]
        raise ValueError(f"input_ids must be in [0, {vocab}) (vocab_size); sample {bad[0]} has id "
                         f"{ids[tuple(bad)]} at position {bad[1]}")
    labels = np.asarray(batch["labels"])
    bad_lab = (labels != IGNORE) & ((labels < 0) | (labels >= vocab))
    if bad_lab.any():
        b, s = np.argwhere(bad_lab)[0]
        raise ValueError(f"labels must be {IGNORE} or in [0, {vocab}); sample {b} has {labels[b, s]} at position {s}")
    inputs = batch.get("encoder_inputs") or {}
    index = batch.get("feature_index") or {}
    for name in sorted(set(inputs) | set(index)):
        if name not in config.encoders:
            raise ValueError(f"batch modality {name!r} has no encoder in the config ({sorted(config.encoders)})")
        if name not in inputs or name not in index:
            raise ValueError(f"modality {name!r} needs both encoder_inputs and feature_index in the batch")
        fi = np.asarray(index[name])
        if fi.shape != ids.shape:
            raise ValueError(f"feature_index[{name!r}] shape {fi.shape} must equal input_ids shape {ids.shape}")
        if config.is_native_resolution(name):
            ecfg = config.encoders[name]
            instances = check_native_input(name, ecfg, inputs[name])
            check_native_alignment(name, ecfg, instances, _shape(inputs[name]["segment_ids"])[1], ids, fi,
                                   np.asarray(batch["span_ids"]), config.placeholder_tokens(name))
        else:
            n = check_encoder_input(name, config.encoders[name], inputs[name])
            total = n * config.features_per_instance(name)
            if fi.size and fi.max() >= total:
                raise ValueError(f"feature_index[{name!r}] max {fi.max()} is beyond the {total} features "
                                 f"({n} instances x {config.features_per_instance(name)} tokens)")
        is_ph = np.isin(ids, config.placeholder_tokens(name))
        n_ph, n_feat = is_ph.sum(axis=1), (fi >= 0).sum(axis=1)
        for b in range(ids.shape[0]):
            if n_ph[b] != n_feat[b]:
                raise ValueError(f"sample {b}: {n_ph[b]} {name!r} placeholder tokens but {n_feat[b]} {name!r} "
                                 f"features (feature_index >= 0)")
        misplaced = (fi >= 0) & ~is_ph
        if misplaced.any():
            b, s = np.argwhere(misplaced)[0]
            raise ValueError(f"sample {b}: feature_index[{name!r}] points at position {s}, which is not a "
                             f"{name!r} placeholder (id {ids[b, s]})")
    for name in config.placeholder_ids:
        if name not in index:
            n_ph = np.isin(ids, config.placeholder_tokens(name)).sum(axis=1)
            if n_ph.any():
                b = int(np.argmax(n_ph > 0))
                raise ValueError(f"sample {b}: {n_ph[b]} {name!r} placeholder tokens but 0 {name!r} features "
                                 f"(the batch has no {name!r} inputs)")
