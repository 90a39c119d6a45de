"""Token-metadata generators for the multimodal mask families, shared by the kernels tests, benchmarks and anyone who
needs realistic masks (context-parallel planner, model tests).

Every generator returns a numpy ``kernels.TokenMeta`` of int32 [B, S]. A sequence is built from pieces: text (span 0,
causal) and spans (one unique id per encoder instance: image, video frame, audio clip), with positions counting up
inside each packed segment. Piece boundaries are jittered by ``seed`` so they do not line up with block boundaries
(which would hide partial-tile bugs), and each batch row gets its own jitter.

    meta = make_meta("video", batch=2, length=256, seed=0, pad=13)   # last 13 tokens of each row are padding
    meta_p, perm = permute(meta, seed=1)                             # the same tokens in a random order
"""

from __future__ import annotations

import numpy as np

from mllm_jax.kernels.meta import TokenMeta

# name -> one-line description (the docs of the benchmark print these).
FAMILIES = {
    "causal": "plain causal text",
    "llava": "LLaVA: text, one image span, text",
    "interleaved": "interleaved text and three images",
    "video": "short prompt, many video-frame spans, answer text",
    "audio_image": "text, an image span, text, an audio-clip span, text",
    "packed": "several packed samples of mixed families with trailing padding",
    "prefix_lm": "prefix-LM: a bidirectional prefix (one span) then causal text",
}
FAMILY_NAMES = tuple(FAMILIES)

# Layouts as (kind, fraction of the segment length); the last piece takes whatever is left.
_LAYOUTS = {
    "causal": [("text", 1.0)],
    "llava": [("text", 0.12), ("span", 0.5), ("text", 1.0)],
    "interleaved": [
        ("text", 0.08), ("span", 0.2), ("text", 0.1), ("span", 0.2), ("text", 0.05), ("span", 0.2), ("text", 1.0),
    ],
    "video": [("text", 0.06)] + [("span", 0.065)] * 12 + [("text", 1.0)],
    "audio_image": [("text", 0.1), ("span", 0.25), ("text", 0.1), ("span", 0.35), ("text", 1.0)],
    "prefix_lm": [("span", 0.33), ("text", 1.0)],
}


def _piece_lengths(layout, length: int, rng: np.random.Generator) -> list[int]:
    """Lengths of the pieces of one segment of ``length`` tokens; boundaries jittered by a few tokens."""
    out, left = [], length
    for i, (_, frac) in enumerate(layout):
        if left <= 0:
            out.append(0)
            continue
        if i == len(layout) - 1:
            n = left
        else:
            base = frac * length
            jitter = rng.integers(-3, 4) if base >= 8 else 0
            n = int(np.clip(round(base) + jitter, 1, left))
        out.append(n)
        left -= n
    return out


def _segment(family: str, length: int, rng, next_span: int):
    """positions, span ids of one segment and the next free span id."""
    layout = _LAYOUTS[family]
    pos = np.arange(length, dtype=np.int32)
    span = np.zeros(length, np.int32)
    start = 0
    for (kind, _), n in zip(layout, _piece_lengths(layout, length, rng)):
        if kind == "span" and n > 0:
            span[start : start + n] = next_span
            next_span += 1
        start += n
    return pos, span, next_span


def _row(family: str, length: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if family != "packed":
        pos, span, _ = _segment(family, length, rng, 1)
        return pos, np.ones(length, np.int32), span
    # Packed: 2-4 samples of random non-packed families and random lengths, then some padding.
    pos = np.zeros(length, np.int32)
    seg = np.zeros(length, np.int32)
    span = np.zeros(length, np.int32)
    pad = int(rng.integers(0, max(1, length // 10)))
    n_samples = int(min(rng.integers(2, 5), max(1, length - pad)))
    cuts = np.sort(rng.choice(np.arange(1, length - pad), size=n_samples - 1, replace=False))
    bounds = [0, *cuts.tolist(), length - pad]
    next_span = 1
    names = [f for f in _LAYOUTS]
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b <= a:
            continue
        fam = names[int(rng.integers(len(names)))]
        p, sp, next_span = _segment(fam, b - a, rng, next_span)
        pos[a:b], span[a:b], seg[a:b] = p, sp, s + 1
    return pos, seg, span


def make_meta(family: str, batch: int, length: int, *, seed: int = 0, pad: int = 0) -> TokenMeta:
    """TokenMeta [batch, length] for ``family`` (one of FAMILY_NAMES); the last ``pad`` tokens are padding."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILY_NAMES}; got {family!r}")
    if not 0 <= pad < length:
        raise ValueError(f"pad must be in [0, length={length}); got {pad}")
    rows = []
    for b in range(batch):
        rng = np.random.default_rng([seed, b, length])
        rows.append(_row(family, length - pad, rng))
    pos, seg, span = (np.stack([r[i] for r in rows]) for i in range(3))
    if pad:
        z = np.zeros((batch, pad), np.int32)
        pos, seg, span = (np.concatenate([a, z], axis=1) for a in (pos, seg, span))
    return TokenMeta(pos.astype(np.int32), seg.astype(np.int32), span.astype(np.int32))


def permutation(batch: int, length: int, *, seed: int) -> np.ndarray:
    """A random permutation per row, int32 [batch, length]."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(length) for _ in range(batch)]).astype(np.int32)


def permute(meta: TokenMeta, *, seed: int) -> tuple[TokenMeta, np.ndarray]:
    """The same tokens in a random order per row; returns (permuted meta, index [B, S]) with meta_p = meta[index]."""
    b, s = meta.shape
    index = permutation(b, s, seed=seed)
    return meta.take(index), index


def take_tokens(x_BS, index_BS):
    """Gather x [B, S, ...] along the sequence by index [B, S] (numpy or jax) to match a permuted meta."""
    idx = index_BS.reshape(index_BS.shape + (1,) * (x_BS.ndim - 2))
    if isinstance(x_BS, np.ndarray):
        return np.take_along_axis(x_BS, idx, axis=1)
    import jax.numpy as jnp

    return jnp.take_along_axis(x_BS, jnp.asarray(idx), axis=1)


def all_cases(batch: int, length: int, *, seed: int = 0, pad: int = 0):
    """(name, meta) for every family, plus the 'permuted' case: the interleaved family with tokens shuffled."""
    cases = [(f, make_meta(f, batch, length, seed=seed, pad=pad)) for f in FAMILY_NAMES]
    cases.append(("permuted", permute(make_meta("interleaved", batch, length, seed=seed, pad=pad), seed=seed + 1)[0]))
    return cases


def cases_with_permutations(batch: int, length: int):
    """(name, q_meta, k_meta, k_index) for the kernel tests: every case of all_cases (seed 1, 7 padding tokens) with
    q_meta = k_meta, plus the audio_image family (5 padding tokens) with k permuted ('k_permuted') and with q and k
    permuted independently of each other ('q_and_k_permuted'); k_index gathers k and v to match k_meta."""
    out = [(name, m, m, None) for name, m in all_cases(batch, length, seed=1, pad=7)]
    base = make_meta("audio_image", batch, length, seed=2, pad=5)
    k_meta, k_index = permute(base, seed=3)
    out.append(("k_permuted", base, k_meta, k_index))
    q_meta, _ = permute(base, seed=4)
    out.append(("q_and_k_permuted", q_meta, k_meta, k_index))
    return out
