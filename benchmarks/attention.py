"""Tile skipping, accuracy and CPU speed of the attention implementations over the multimodal mask families.

    python benchmarks/attention.py --out attention.json [--quick]

Per family (tests/mask_families.py) it reports:
- computed_over_nonempty["<impl>@<S>"]: tiles the implementation computed / tiles with at least one attending pair.
  Must be exactly 1.0. Computed tiles are counted where the implementation iterates: a counter incremented inside
  the tiled path's tile loop and inside the Pallas GPU kernel's tile loop (interpret mode) at the smaller size; at the
  larger size, where running them on CPU would take too long, the sum of the trip counts of those same loops (the
  compacted schedule both are driven by). Non-empty tiles are exact: from mllm_jax.kernels.meta.dense_block_map computed in
  chunks of q rows at the smaller size; at the larger size (a dense 32K x 32K mask is too much work on 2 cores)
  from an exact per-tile check of every tile the block map does not skip (tiles it skips are empty: tests prove
  the block map sound against the dense map).
- computed_over_dense: the same computed tiles / all tiles: the fraction of a dense kernel's work that remains.
- max_abs_err: forward output against kernels.reference at S_err (fp32), for tiled and Pallas GPU (interpret),
  and tiled against jax.nn.dot_product_attention with a dense mask at the timing size (rows that attend
  something; dot_product_attention has no defined output for empty rows).
And xla_speedup_vs_dense[family]: time of jax.nn.dot_product_attention(mask=dense) / time of
kernels.attention(impl="xla") (the tiled path on CPU), forward, 1 head, small head dim, jitted, best of
the repeats; plus their geometric mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._report import report  # noqa: E402
from mllm_jax import kernels  # noqa: E402
from mllm_jax.kernels import TokenMeta  # noqa: E402
from mllm_jax.kernels.tiled import default_block, tile_schedule, tiled_attention, tiled_attention_with_count  # noqa: E402
from mllm_jax.kernels.meta import SKIP, block_map, dense_block_map, mask  # noqa: E402
from mllm_jax.kernels.pallas_gpu import default_blocks, flash_attention, flash_attention_with_count  # noqa: E402
from mllm_jax.kernels.reference import reference_attention  # noqa: E402
from mask_families import FAMILIES, make_meta  # noqa: E402

FULL_RUN = dict(sizes=(8192, 32768), count_run_max=8192, err_size=2048, time_size=8192, repeats=2, head_dim=32)
QUICK_RUN = dict(sizes=(512, 1024), count_run_max=512, err_size=256, time_size=1024, repeats=1, head_dim=16)


def exact_nonempty_dense(meta: TokenMeta, bq: int, bk: int, chunk_rows: int = 1024) -> int:
    """Non-empty tiles from the dense mask, chunk_rows q rows at a time (a multiple of bq)."""
    rows = max(bq, chunk_rows // bq * bq)
    total = 0
    for start in range(0, meta.shape[1], rows):
        q = TokenMeta(*(a[:, start : start + rows] for a in meta))
        total += int((dense_block_map(q, meta, bq, bk) != SKIP).sum())
    return total


def exact_nonempty_unskipped(meta: TokenMeta, bq: int, bk: int, tiles_per_chunk: int = 1024) -> int:
    """Non-empty tiles, checking every tile the block map does not skip pair by pair (its skipped tiles are empty)."""
    bm = block_map(meta, meta, bq, bk)
    b, s = meta.shape
    nq, nk = bm.shape[1:]

    def blocks(block, n):  # [B, n, block] per field, padded with padding tokens (segment 0)
        pad = n * block - s
        return TokenMeta(*(np.pad(a, ((0, 0), (0, pad))).reshape(b, n, block) for a in meta))

    qb, kb = blocks(bq, nq), blocks(bk, nk)
    idx = np.argwhere(bm != SKIP)
    total = 0
    for start in range(0, len(idx), tiles_per_chunk):
        bi, qi, kj = idx[start : start + tiles_per_chunk].T
        q = TokenMeta(*(a[bi, qi] for a in qb))  # [n_tiles, bq]: each tile's q side as a batch row
        k = TokenMeta(*(a[bi, kj] for a in kb))
        total += int(mask(q, k).any(axis=(1, 2)).sum())
    return total


def _best_time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _qkv(length, head_dim, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (1, length, 1, head_dim), jnp.float32) for kk in keys)


def run(cfg: dict) -> dict:
    d = cfg["head_dim"]
    families = {name: {"computed_over_nonempty": {}, "computed_over_dense": {}, "max_abs_err": {}} for name in FAMILIES}
    timing, speedup = {}, {}

    # jitted once per shape: metadata are traced arguments, so every family reuses the compilation.
    tiled_count = jax.jit(lambda q, k, v, m: tiled_attention_with_count(q, k, v, m, m)[1])
    pallas_count = jax.jit(lambda q, k, v, m: flash_attention_with_count(q, k, v, m, m, interpret=True)[1])
    xla_path = jax.jit(lambda q, k, v, m: kernels.attention(q, k, v, m, m, impl="xla"))
    ref = jax.jit(lambda q, k, v, m: reference_attention(q, k, v, m, m))
    pallas = jax.jit(lambda q, k, v, m: flash_attention(q, k, v, m, m, interpret=True))
    # The tiled path directly: kernels.attention(impl="xla") picks dense for keys as short as S_err.
    tiled = jax.jit(lambda q, k, v, m: tiled_attention(q, k, v, m, m))

    def dense_sdpa(q, k, v, m):
        return jax.nn.dot_product_attention(q, k, v, mask=mask(m, m)[:, None], implementation="xla")

    dense_sdpa = jax.jit(dense_sdpa)

    for name in FAMILIES:
        fam = families[name]
        for s in cfg["sizes"]:
            meta = make_meta(name, 1, s, seed=s)
            blocks = {"tiled": (default_block(s), default_block(s)), "pallas_gpu": default_blocks(s, s, d)}
            for impl, (bq, bk) in blocks.items():
                if s <= cfg["count_run_max"]:
                    nonempty = exact_nonempty_dense(meta, bq, bk)
                    q, k, v = _qkv(s, d)
                    fn = tiled_count if impl == "tiled" else pallas_count
                    computed = int(np.asarray(fn(q, k, v, meta)).sum())  # counted inside the tile loop
                else:
                    nonempty = exact_nonempty_unskipped(meta, bq, bk)
                    computed = int(tile_schedule(meta, meta, bq, bk).count.sum())  # the loops' trip counts
                all_tiles = -(-s // bq) * -(-s // bk)
                fam["computed_over_nonempty"][f"{impl}@{s}"] = computed / nonempty
                fam["computed_over_dense"][f"{impl}@{s}"] = computed / all_tiles

        s = cfg["err_size"]
        meta = make_meta(name, 1, s, seed=1)
        q, k, v = _qkv(s, 64, seed=1)
        want = ref(q, k, v, meta)
        fam["max_abs_err"][f"tiled@{s}"] = float(jnp.abs(tiled(q, k, v, meta) - want).max())
        fam["max_abs_err"][f"pallas_gpu@{s}"] = float(jnp.abs(pallas(q, k, v, meta) - want).max())

        s = cfg["time_size"]
        meta = make_meta(name, 1, s, seed=2)
        q, k, v = _qkv(s, d, seed=2)
        t_xla = _best_time(xla_path, (q, k, v, meta), cfg["repeats"])
        t_dense = _best_time(dense_sdpa, (q, k, v, meta), cfg["repeats"])
        rows_seen = np.asarray(mask(meta, meta).any(-1))[0]
        diff = jnp.abs(xla_path(q, k, v, meta) - dense_sdpa(q, k, v, meta))[0, rows_seen]
        fam["max_abs_err"][f"tiled_vs_dense_sdpa@{s}"] = float(diff.max())
        timing[name] = {"xla_s": t_xla, "dense_sdpa_s": t_dense}
        speedup[name] = t_dense / t_xla
        print(f"{name:12s} {json.dumps(fam)}  time xla {t_xla:.3f}s dense {t_dense:.3f}s", flush=True)

    speedup["geomean"] = float(np.exp(np.mean(np.log([speedup[n] for n in FAMILIES]))))
    return {
        "families": families,
        "xla_speedup_vs_dense": speedup,
        "timing": timing,
        "all_exact": all(v == 1.0 for f in families.values() for v in f["computed_over_nonempty"].values()),
        "config": {**cfg, "sizes": list(cfg["sizes"]), "backend": jax.default_backend(), "jax": jax.__version__},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the final JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every code path")
    args = parser.parse_args(argv)
    result = run(QUICK_RUN if args.quick else FULL_RUN)
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
