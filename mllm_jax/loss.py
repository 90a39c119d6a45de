"""Token-level cross entropy over the vocabulary, chunked along the sequence so full [B, S, V] float32 logits never
exist at once (each chunk's logits are recomputed in the backward pass instead of saved)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.batch import IGNORE
# Upper bound on the float32 logits of one chunk (elements): 16M floats = 64 MiB.
MAX_CHUNK_LOGITS = 1 << 24


def chunk_length(batch: int, length: int, vocab: int, max_logits: int = MAX_CHUNK_LOGITS) -> int:
    """The largest divisor of ``length`` whose chunk of logits [batch, chunk, vocab] has at most ``max_logits``."""
    best = 1
    for c in range(1, length + 1):
        if length % c == 0 and batch * c * vocab <= max_logits:
            best = c
    return best


def chunked_cross_entropy(h_BSD, logits_fn, labels_BS, *, chunk: int | None = None, vocab: int):
    """(sum of -log p(label), number of labels) over positions with labels != -100.

    ``logits_fn(h [B, c, D]) -> [B, c, V]`` float32 is applied per chunk of ``chunk`` positions under remat (when
    there is more than one chunk: a single chunk's logits are the whole [B, S, V] anyway, and remat would only add a
    second logits matmul to the backward).
    """
    b, s, d = h_BSD.shape
    if labels_BS.shape != (b, s):
        raise ValueError(f"labels shape {labels_BS.shape} must equal the tokens' shape {(b, s)}")
    c = chunk or chunk_length(b, s, vocab)
    if s % c:
        raise ValueError(f"loss chunk ({c}) must divide the sequence length ({s})")
    n = s // c
    h_nBcD = jnp.swapaxes(h_BSD.reshape(b, n, c, d), 0, 1)
    l_nBc = jnp.swapaxes(labels_BS.reshape(b, n, c), 0, 1)

    def one(h_BcD, l_Bc):
        logits = logits_fn(h_BcD).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        vocab_ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        target = jnp.sum(jnp.where(vocab_ids == l_Bc[..., None], logits, 0.0), axis=-1)
        valid = l_Bc != IGNORE
        return jnp.sum(jnp.where(valid, lse - target, 0.0)), jnp.sum(valid.astype(jnp.int32))

    if n == 1:
        return one(h_BSD, labels_BS)
    one = jax.checkpoint(one)

    def step(carry, xs):
        total, count = carry
        t, k = one(*xs)
        return (total + t, count + k), None

    (total, count), _ = jax.lax.scan(step, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (h_nBcD, l_nBc))
    return total, count
