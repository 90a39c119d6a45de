"""Context-parallel load balance: uniform / zigzag / lpt (Cornstarch) / balanced (ours) over multimodal mask families.

    python benchmarks/cp_balance.py --out cp_balance.json [--quick]

For S in {16K, 32K, 64K}, cp = 8 and 50 random masks per family, reports per mode the max rank cost over the lower
bound total / cp (1.0 = perfect), mean and worst over the masks, for the combined cost (alpha * tiles + beta * tokens,
parallel.context.CostModel defaults: a Llama-3-8B layer) and for the tile cost alone. Also: planning time for a 128K
batch, compiled per-rank FLOPs (cost_analysis of each rank's tile-skipping attention + linear layers, in a subprocess
with 8 fake devices, one mask per family and mode), and a PNG of per-rank loads. Prints one final JSON line and
writes it to --out. ``--kernel_tiles``: plans on pallas_tpu's tile at 32K with block 128 and "auto";
``--auto_block``: ContextConfig.block = "auto" against 128 on every family at 8K-32K (``auto_block_costs``).

Families (Cornstarch's context-parallel microbenchmark, cornstarch_notes.md, expressed with the (segment, span,
position) rule of docs/architecture.md):
- causal_blockwise: APPROXIMATED. Cornstarch's blocks are causal and mutually invisible except the last block, which
  attends to everything before it. Two same-segment tokens always see one another in at least one direction under
  our rule, so the last block cannot see blocks that cannot see each other. Nearest MLLM-relevant equivalent:
  packed independent causal documents (one segment per block), the last one included.
- prefix_lm_causal: exact: one segment, a bidirectional span prefix of 10-100 % of S, then causal text.
- prefix_lm_document: exact: a prefix-LM document, bidirectional documents (one span each), a causal last document.
- encoder_embedded: causal text alternating with bidirectional encoder spans of S/64 to S/16 tokens, one segment.
  Encoder tokens also see the text before them (our rule; Cornstarch's bitfield hides it from them).
- multimodal_packed: 4 packed sub-sequences, each one of the three families just above.
Plus MLLM workloads: llava_single_image (packed prompt + 576-token image + answer samples), interleaved_multi_image,
video (frame groups as spans + text), audio_image (Cornstarch's evaluation: an image at S/4 and a Whisper clip at
3S/4 in text), variable_resolution (packed samples of 1-3 images at their own size or videos, each instance a span
of the token count the Qwen2-VL processor gives it: benchmarks/_variable_resolution.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _variable_resolution as varres  # noqa: E402
from benchmarks._report import report  # noqa: E402
from mllm_jax.data.processor.native_vision import NativeVisionProcessor  # noqa: E402
from mllm_jax.kernels.meta import TokenMeta  # noqa: E402
from mllm_jax.parallel.context import MODES, CostModel, auto_block, block_costs, plan  # noqa: E402

# ------------------------------------------------------------------------------------------------ mask families


class _Builder:
    """Appends pieces to one [S] sequence: text (causal) or spans (bidirectional), segments packed one after another.
    Positions restart at 0 in each segment; span ids are unique over the sequence."""

    def __init__(self, length: int):
        self.length = length
        self.pos = np.zeros(length, np.int32)
        self.seg = np.zeros(length, np.int32)
        self.span = np.zeros(length, np.int32)
        self.t = 0
        self.segment = 0
        self.next_span = 1
        self.p = 0

    @property
    def left(self) -> int:
        return self.length - self.t

    def new_segment(self):
        self.segment += 1
        self.p = 0

    def add(self, n: int, span: bool = False) -> int:
        n = max(0, min(int(n), self.left))
        sl = slice(self.t, self.t + n)
        self.pos[sl] = np.arange(self.p, self.p + n)
        self.seg[sl] = self.segment
        if span and n:
            self.span[sl] = self.next_span
            self.next_span += 1
        self.t += n
        self.p += n
        return n

    def meta(self) -> TokenMeta:
        return TokenMeta(self.pos[None], self.seg[None], self.span[None])


def _causal_blockwise(b: _Builder, rng, length):
    n = int(rng.integers(4, 17))
    cuts = np.sort(rng.choice(np.arange(1, length), n - 1, replace=False)) if length > n else np.arange(1, n)
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, length]):
        b.new_segment()
        b.add(hi - lo)


def _prefix_lm_causal(b: _Builder, rng, length):
    b.new_segment()
    prefix = int(length * rng.uniform(0.1, 1.0))
    b.add(prefix, span=True)
    b.add(length - prefix)


def _prefix_lm_document(b: _Builder, rng, length):
    n = int(rng.integers(3, 9))
    w = rng.dirichlet(np.ones(n))
    sizes = np.maximum(1, (w * length).astype(int))
    sizes[-1] = max(1, length - sizes[:-1].sum())
    for i, sz in enumerate(sizes):
        b.new_segment()
        if i == 0:
            prefix = int(sz * rng.uniform(0.1, 0.9))
            b.add(prefix, span=True)
            b.add(sz - prefix)
        elif i == n - 1:
            b.add(sz)
        else:
            b.add(sz, span=True)


def _encoder_embedded(b: _Builder, rng, length, total=None):
    total = total or length
    b.new_segment()
    end = b.t + length
    while b.t < end:
        b.add(min(end - b.t, int(rng.integers(total // 64, total // 16 + 1))))
        b.add(min(end - b.t, int(rng.integers(total // 64, total // 16 + 1))), span=True)


def _multimodal_packed(b: _Builder, rng, length):
    w = rng.dirichlet(np.ones(4))
    sizes = np.maximum(1, (w * length).astype(int))
    sizes[-1] = length - sizes[:-1].sum()
    for sz in sizes:
        kind = int(rng.integers(3))
        if kind == 0:
            _prefix_lm_causal(b, rng, sz)
        elif kind == 1:
            _prefix_lm_document(b, rng, sz)
        else:
            _encoder_embedded(b, rng, sz, total=length)


def _packed(b: _Builder, sample):
    """Pack samples until the sequence is full (the last one truncated); the rest stays padding only if nothing fits."""
    while b.left > 0:
        b.new_segment()
        sample(b)


def _llava_single_image(b: _Builder, rng, length):
    def sample(b):
        b.add(rng.integers(20, 60))
        b.add(576, span=True)
        b.add(rng.integers(20, 400))

    _packed(b, sample)


def _interleaved_multi_image(b: _Builder, rng, length):
    def sample(b):
        for _ in range(int(rng.integers(2, 7))):
            b.add(rng.integers(30, 300))
            b.add(rng.choice([256, 576, 729]), span=True)
        b.add(rng.integers(50, 500))

    _packed(b, sample)


def _video(b: _Builder, rng, length):
    def sample(b):
        b.add(rng.integers(20, 80))
        frame = int(rng.choice([64, 144, 196, 256]))
        for _ in range(int(rng.integers(8, 33))):
            b.add(frame, span=True)
        b.add(rng.integers(50, 600))

    _packed(b, sample)


_NATIVE_PROCESSOR = None


def _variable_resolution(b: _Builder, rng, length):
    """Packed samples of images at their own size and some videos (benchmarks/_variable_resolution.py): each
    instance one span of its real token count (t*h*w/4 after the Qwen2-VL processor's resize), text around them."""
    global _NATIVE_PROCESSOR
    if _NATIVE_PROCESSOR is None:
        _NATIVE_PROCESSOR = NativeVisionProcessor.for_model(varres.qwen25vl_7b().encoders["vision"])
    proc = _NATIVE_PROCESSOR

    def sample(b):
        for _ in range(int(rng.integers(1, 4))):
            b.add(rng.integers(10, 200))
            b.add(varres.draw_instance(rng, proc, max_video_seconds=20.0).tokens, span=True)
        b.add(rng.integers(20, 400))

    _packed(b, sample)


def _audio_image(b: _Builder, rng, length):
    image = min(int(rng.integers(1024, 3601)), length // 4)
    audio = min(int(rng.integers(750, 1501)), length // 4)
    b.new_segment()
    b.add(int(length * rng.uniform(0.2, 0.3)))
    b.add(image, span=True)
    b.add(max(0, int(length * rng.uniform(0.7, 0.8)) - b.t))
    b.add(audio, span=True)
    b.add(b.left)


FAMILIES = {
    "causal_blockwise": _causal_blockwise,
    "prefix_lm_causal": _prefix_lm_causal,
    "prefix_lm_document": _prefix_lm_document,
    "encoder_embedded": _encoder_embedded,
    "multimodal_packed": _multimodal_packed,
    "llava_single_image": _llava_single_image,
    "interleaved_multi_image": _interleaved_multi_image,
    "video": _video,
    "audio_image": _audio_image,
    "variable_resolution": _variable_resolution,
}
APPROXIMATED = {
    "causal_blockwise": "last block does not attend to earlier blocks (not expressible); packed causal documents",
    "encoder_embedded": "encoder spans also see earlier text (our rule); Cornstarch's bitfield hides it",
}


def family_meta(family: str, length: int, rng) -> TokenMeta:
    """One random [1, length] TokenMeta (numpy) of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}; got {family!r}")
    b = _Builder(length)
    FAMILIES[family](b, rng, length)
    return b.meta()


# ---------------------------------------------------------------------------------------------------- measuring


def balance_stats(sizes, n_masks, cp, seed=0):
    """{S: {family: {mode: {mean_ratio, worst_ratio, tile_mean_ratio, tile_worst_ratio}}}} and one example per family."""
    out, examples = {}, {}
    for s in sizes:
        out[s] = {}
        for fi, family in enumerate(FAMILIES):
            rng = np.random.default_rng([seed, s, fi])
            ratios = {m: ([], []) for m in MODES}
            for i in range(n_masks):
                meta = family_meta(family, s, rng)
                costs = block_costs(meta)
                for mode in MODES:
                    p = plan(meta, cp, mode, costs=costs)
                    ratios[mode][0].append(p.imbalance("cost"))
                    ratios[mode][1].append(p.imbalance("tiles"))
                    if s == sizes[0] and i == 0:
                        examples.setdefault(family, {})[mode] = p.rank_cost.tolist()
            out[s][family] = {
                m: {
                    "mean_ratio": float(np.mean(c)),
                    "worst_ratio": float(np.max(c)),
                    "tile_mean_ratio": float(np.mean(t)),
                    "tile_worst_ratio": float(np.max(t)),
                }
                for m, (c, t) in ratios.items()
            }
    return out, examples


def planning_time_ms(length=131072, cp=8, repeats=5):
    rng = np.random.default_rng(1)
    res = {}
    for family in ("multimodal_packed", "video"):
        meta = family_meta(family, length, rng)
        for mode in ("lpt", "balanced"):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                plan(meta, cp, mode)
                times.append(time.perf_counter() - t0)
            res[f"{family}/{mode}"] = 1e3 * float(np.median(times))
    return res


_FLOPS_CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, sys.argv[1])
import numpy as np, jax, jax.numpy as jnp
from benchmarks.cp_balance import FAMILIES, family_meta
from mllm_jax.parallel.context import MODES, CostModel, plan
from mllm_jax.kernels.meta import dense_block_map
length, cp = int(sys.argv[2]), int(sys.argv[3])
cm = CostModel()
H, D, DM, FF, KV = cm.n_heads, cm.head_dim, cm.d_model, cm.d_ff, cm.n_kv_heads
assert len(jax.devices()) == 8, jax.devices()
cache = {}

def rank_flops(n_tiles, n_tokens):
    # One rank's program: attention on its non-empty 128x32 tiles only (what a tile-skipping kernel runs) plus its
    # real tokens through the layer's projections and gated MLP. Lowered from shapes only; never executed.
    key = (n_tiles, n_tokens)
    if key not in cache:
        def f(qt, kt, vt, x, wq, wkv, wo, w13, w2):
            s = jnp.einsum("thqd,thkd->thqk", qt, kt)
            o = jnp.einsum("thqk,thkd->thqd", jax.nn.softmax(s, -1), vt)
            h = x @ wq, x @ wkv, (x @ wq) @ wo
            g = x @ w13
            return o.sum() + sum(a.sum() for a in h) + (g[:, :FF] * g[:, FF:] @ w2).sum()
        S = jax.ShapeDtypeStruct
        args = (S((n_tiles, H, 128, D), jnp.float32), S((n_tiles, H, 32, D), jnp.float32),
                S((n_tiles, H, 32, D), jnp.float32), S((n_tokens, DM), jnp.float32), S((DM, H * D), jnp.float32),
                S((DM, 2 * KV * D), jnp.float32), S((H * D, DM), jnp.float32), S((DM, 2 * FF), jnp.float32),
                S((FF, DM), jnp.float32))
        ca = jax.jit(f).lower(*args).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        cache[key] = float(ca["flops"])
    return cache[key]

out = {}
for fi, family in enumerate(FAMILIES):
    meta = family_meta(family, length, np.random.default_rng([7, fi]))
    out[family] = {}
    for mode in MODES:
        p = plan(meta, cp, mode)
        pm = p.permute_meta(meta)
        rows = (dense_block_map(pm, pm, 128, 32) != 0).sum(-1).reshape(cp, -1).sum(-1)  # independent recount
        toks = (pm.segment_ids != 0).reshape(cp, -1).sum(-1)
        flops = [rank_flops(int(t), int(n)) for t, n in zip(rows, toks)]
        out[family][mode] = {"compiled_ratio": max(flops) / np.mean(flops), "planned_ratio": p.imbalance("cost"),
                             "max_rank_gflops": max(flops) / 1e9}
print("RESULT" + json.dumps(out))
"""


def compiled_flops(length, cp):
    """Per-rank compiled FLOPs ratios, in a subprocess with 8 fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _FLOPS_CHILD, root, str(length), str(cp)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"compiled-FLOPs subprocess failed:\n{r.stderr[-3000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def plot(examples, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(examples)
    cols = 3
    fig, axes = plt.subplots(-(-len(fams) // cols), cols, figsize=(15, 3.2 * -(-len(fams) // cols)))
    for ax, fam in zip(np.ravel(axes), fams):
        modes = examples[fam]
        cp = len(next(iter(modes.values())))
        width = 0.8 / len(modes)
        for i, (mode, loads) in enumerate(modes.items()):
            loads = np.asarray(loads)
            ax.bar(np.arange(cp) + i * width, loads / loads.mean(), width, label=mode)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("context rank")
        ax.set_ylabel("load / mean")
    np.ravel(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def measured_rank_tiles(meta: TokenMeta, p, *, method: str = "ring", impl: str = "xla", interpret: bool = True,
                        block_q: int | None = None, block_k: int | None = None, heads: int = 2, head_dim: int = 16,
                        seed: int = 0) -> np.ndarray:
    """The tiles each context rank's attention really computes under plan ``p``: the batch with metadata ``meta`` is
    permuted by ``p.permutation`` and kernels.context_parallel.context_attention (``method`` "ring" or "allgather",
    ``impl`` "xla" (kernels.tiled), "pallas_tpu" or "pallas_gpu", Pallas in interpret mode on CPU; block sizes
    ``block_q`` x ``block_k``, None: the kernel's defaults) is compiled and run under jax.shard_map on ``p.cp``
    devices. Each rank's forward counts its tiles in the kernel itself (context_parallel.record_rank_tiles):
    kernels.tiled's tile loop, the Pallas GPU kernel's tile loop, the Pallas TPU kernel's grid over its
    scalar-prefetched live-tile lists. int64 [cp] summed over the batch rows (and ring steps). Needs ``p.cp`` devices
    (8 fake CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mllm_jax.kernels import context_parallel

    if len(jax.devices()) < p.cp:
        raise ValueError(f"measured_rank_tiles needs {p.cp} devices (the plan's cp); jax has {len(jax.devices())}: "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={p.cp} before jax starts")
    pm = p.permute_meta(meta)
    b, s = pm.segment_ids.shape
    mesh = jax.make_mesh((p.cp,), ("context",), devices=jax.devices()[: p.cp])
    seq = NamedSharding(mesh, P(None, "context"))
    x = jax.device_put(jax.random.normal(jax.random.key(seed), (b, s, heads, head_dim)), seq)
    m = TokenMeta(*(jax.device_put(jnp.asarray(a), seq) for a in pm))
    with context_parallel.record_rank_tiles() as record:
        f = jax.jit(lambda x, m: context_parallel.context_attention(
            x, x, x, m, m, mesh=mesh, method=method, impl=impl, interpret=interpret, block_q=block_q,
            block_k=block_k))
        jax.block_until_ready(f(x, m))
        jax.effects_barrier()
    tiles = np.zeros(p.cp, np.int64)
    for rank, n in record:
        tiles[rank] += n
    return tiles


# (method, impl, block_q, block_k) of the context attention kernel_rank_balance runs; None: the kernel's default.
RING_TILED = (("ring", "xla", None, None),)
ALL_KERNELS = (("ring", "xla", None, None), ("allgather", "xla", None, None), ("ring", "pallas_tpu", 128, 256),
               ("allgather", "pallas_tpu", 128, 256), ("ring", "pallas_gpu", 32, 64),
               ("allgather", "pallas_gpu", 64, 32))


def kernel_rank_balance(length=4096, cp=4, families=("multimodal_packed", "llava_single_image"),
                        modes=("zigzag", "balanced"), block=128, heads=2, head_dim=16, kernels=RING_TILED):
    """Per-rank balance of the real context-parallel attention against the planner's prediction. Per kernel
    (``kernels``: (method, impl, block_q, block_k), Pallas in interpret mode), family and mode: the plan (planner
    block ``block``, the kernel's tile: its blocks, else kernels.dispatch.kernel_tile on CPU), then
    ``measured_rank_tiles``: the context attention itself compiled and run on ``cp`` fake devices, each rank's tiles
    counted by the kernel, and its forward FLOPs (4 x tile_q x tile_k x head_dim per tile and query head).
    ``agree``: the measured tiles are the planned ones rank by rank. Why measured and not the compiler's cost
    analysis: the ranks run one SPMD program whose tile loops have data-dependent trip counts, so its compiled FLOPs
    are the same on every rank."""
    from mllm_jax.kernels.dispatch import kernel_tile

    out = {}
    for method, impl, bq, bk in kernels:
        name = f"{method}/{impl}"
        out[name] = {}
        for fi, family in enumerate(families):
            meta = family_meta(family, length, np.random.default_rng([11, fi]))
            out[name][family] = {}
            for mode in modes:
                unit = (2 * cp if mode == "zigzag" else cp) * block
                shard = -(-length // unit) * unit // cp
                keys = shard if method == "ring" else shard * cp
                kernel = "tiled" if impl == "xla" and method == "ring" else impl  # the ring's CPU step
                tile = (bq, bk) if bq else kernel_tile(kernel, shard, keys, head_dim, backend="cpu")
                p = plan(meta, cp, mode, block=block, tile_q=tile[0], tile_k=tile[1], method=method)
                tiles = measured_rank_tiles(meta, p, method=method, impl=impl, block_q=bq, block_k=bk, heads=heads,
                                            head_dim=head_dim)
                flops = tiles * 4.0 * tile[0] * tile[1] * head_dim * heads
                out[name][family][mode] = {
                    "tile": list(tile), "measured_ratio": float(tiles.max() / tiles.mean()),
                    "planned_tile_ratio": float(p.rank_tiles.max() / p.rank_tiles.mean()),
                    "measured_rank_tiles": tiles.tolist(), "planned_rank_tiles": p.rank_tiles.tolist(),
                    "rank_attention_mflops": [f / 1e6 for f in flops],
                    "agree": bool(np.array_equal(tiles, p.rank_tiles))}
    return {"seq_len": length, "cp": cp, "block": block, "kernels": out,
            "all_agree": all(r["agree"] for k in out.values() for f in k.values() for r in f.values())}


def kernel_tile_plans(length=32768, cp=8, families=("multimodal_packed", "video", "prefix_lm_document"),
                      tile=(512, 1024), blocks=(128, "auto"), repeats=5):
    """Plans counted on the kernel's own tile (default pallas_tpu's 512 x 1024 on v5e, all-gather) per family and
    planner block ("auto": parallel.context.auto_block for this length and tile): the planning time (median of
    ``repeats``) with the tiles cut to divide the block (the planner before it counted kernel tiles spanning blocks),
    with exact kernel tiles, and with the refinement on them; and each plan's largest rank cost (alpha * kernel tiles
    + beta * tokens, FLOPs) and max / mean over the ranks."""
    blocks = [auto_block(length, cp, "balanced", *tile) if b == "auto" else b for b in blocks]
    def timed(**kw):
        plan(meta, cp, "balanced", **kw)
        times, p = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            p = plan(meta, cp, "balanced", **kw)
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times)), p

    out = {}
    for fi, family in enumerate(families):
        meta = family_meta(family, length, np.random.default_rng([13, fi]))
        out[family] = {}
        for block in blocks:
            cut_ms, _ = timed(block=block, tile_q=np.gcd(block, tile[0]), tile_k=np.gcd(block, tile[1]))
            exact_ms, raw = timed(block=block, tile_q=tile[0], tile_k=tile[1], refine_rounds=0)
            refined_ms, ref = timed(block=block, tile_q=tile[0], tile_k=tile[1])
            out[family][str(block)] = {
                "plan_ms_tiles_cut_to_block": cut_ms, "plan_ms_exact": exact_ms, "plan_ms_exact_refined": refined_ms,
                "max_rank_cost_exact": float(raw.rank_cost.max()), "max_rank_cost_refined": float(ref.rank_cost.max()),
                "cost_ratio_exact": raw.imbalance(), "cost_ratio_refined": ref.imbalance(),
                "tile_ratio_refined": ref.imbalance("tiles")}
    return {"seq_len": length, "cp": cp, "tile": list(tile), "method": "allgather", "blocks": blocks,
            "families": out}


# (attention_impl, backend, generation) of the context attention on each target, for ContextConfig.block = "auto".
AUTO_TARGETS = {"tpu_v5e": ("pallas_tpu", "tpu", "v5e"), "gpu_h100": ("pallas_gpu", "gpu", "h100"),
                "cpu": ("auto", "cpu", None)}


def auto_block_costs(lengths=(8192, 16384, 32768), cp=8, methods=("allgather", "ring"), target="tpu_v5e", seed=21):
    """ContextConfig.block = "auto" against 128 on every family (one mask each), balanced, through the host path
    (data.context_batches.permute_for_context on the target's kernel): per length and method the auto block, the
    kernel tile, and per family the largest rank cost (alpha * the kernel's exact live tiles + beta * tokens, the
    plan's own count) of each block and auto / 128. Also the auto block the other targets' kernels give."""
    from mllm_jax.data.context_batches import context_block, permute_for_context
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    impl, backend, gen = AUTO_TARGETS[target]
    out, ratios = {}, []
    for s in lengths:
        for method in methods:
            row, fam = {}, {}
            for fi, family in enumerate(FAMILIES):
                meta = family_meta(family, s, np.random.default_rng([seed, fi, s]))
                ids = np.ones_like(meta.positions)
                batch = {"input_ids": ids, "labels": ids, "positions": meta.positions,
                         "segment_ids": meta.segment_ids, "span_ids": meta.span_ids}
                cost = {}
                for block in ("auto", 128):
                    pc = ParallelConfig(context=cp, context_config=ContextConfig(block=block, attention=method))
                    _, p = permute_for_context(batch, pc, leading=0, attention_impl=impl, backend=backend,
                                               generation=gen)
                    cost[block] = float(p.rank_cost.max())
                    if block == "auto":
                        row.update(auto_block=p.block, tile=[p.tile_q, p.tile_k], padded_len=p.padded_len)
                fam[family] = {"max_rank_cost_auto": cost["auto"], "max_rank_cost_128": cost[128],
                               "auto_over_128": cost["auto"] / cost[128]}
                ratios.append(cost["auto"] / cost[128])
            row["families"] = fam
            out[f"{s}/{method}"] = row
    others = {t: {str(s): context_block(ParallelConfig(context=cp, context_config=ContextConfig(block="auto")), s,
                                         128, *AUTO_TARGETS[t]) for s in lengths} for t in AUTO_TARGETS}
    return {"target": target, "cp": cp, "mode": "balanced", "by_seq_len_method": out,
            "auto_over_128_max": max(ratios), "auto_over_128_min": min(ratios),
            "auto_le_128_every_family": max(ratios) <= 1.0, "auto_block_all_gather_per_target": others}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="S = 4K, 3 masks per family: a smoke test")
    ap.add_argument("--cp", type=int, default=8)
    ap.add_argument("--masks", type=int, default=None)
    ap.add_argument("--no_flops", action="store_true")
    ap.add_argument("--kernel_ranks", action="store_true",
                    help="run the real context attention (ring and all-gather; kernels.tiled, Pallas TPU and GPU in "
                         "interpret mode) on 4 fake devices and compare each rank's tiles with the plan")
    ap.add_argument("--kernel_tiles", action="store_true",
                    help="plans on pallas_tpu's 512 x 1024 tiles at S = 32K, cp = 8: planning time and rank costs "
                         "(block 128 and ContextConfig.block = 'auto')")
    ap.add_argument("--auto_block", action="store_true",
                    help="ContextConfig.block = 'auto' vs 128 on every family at S = 8K-32K, cp = 8, pallas_tpu v5e "
                         "(all-gather and ring): the largest rank's cost on the kernel's exact tiles")
    args = ap.parse_args(argv)
    if args.kernel_ranks and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sizes = [4096] if args.quick else [16384, 32768, 65536]
    n_masks = args.masks or (3 if args.quick else 50)
    t0 = time.perf_counter()
    by_len, examples = balance_stats(sizes, n_masks, args.cp)
    families = {}
    for fam in FAMILIES:
        families[fam] = {}
        for mode in MODES:
            rs = [by_len[s][fam][mode] for s in sizes]
            families[fam][mode] = {
                "mean_ratio": float(np.mean([r["mean_ratio"] for r in rs])),
                "worst_ratio": float(max(r["worst_ratio"] for r in rs)),
                "tile_mean_ratio": float(np.mean([r["tile_mean_ratio"] for r in rs])),
                "tile_worst_ratio": float(max(r["tile_worst_ratio"] for r in rs)),
            }
    targets = {
        "balanced_mean_ratio_le_1.02_every_family_and_S": all(
            by_len[s][f]["balanced"]["mean_ratio"] <= 1.02 for s in sizes for f in FAMILIES
        ),
        "balanced_le_lpt_combined_every_family_and_S": all(
            by_len[s][f]["balanced"]["mean_ratio"] <= by_len[s][f]["lpt"]["mean_ratio"]
            and by_len[s][f]["balanced"]["worst_ratio"] <= by_len[s][f]["lpt"]["worst_ratio"]
            for s in sizes for f in FAMILIES
        ),
    }
    png = os.path.splitext(args.out)[0] + ".png"
    plot(examples, png)
    cm = CostModel()
    result = {
        "families": families,
        "by_seq_len": {str(s): v for s, v in by_len.items()},
        "targets": targets,
        "plan_time_ms_128k_cp8": planning_time_ms(repeats=2 if args.quick else 5),
        "settings": {"seq_lens": sizes, "cp": args.cp, "masks_per_family": n_masks, "block": 128, "tile": [128, 32],
                     "alpha_flops_per_tile": cm.alpha, "beta_flops_per_token": cm.beta,
                     "ratio": "max rank cost / (total / cp); mean_ratio/worst_ratio on alpha*tiles+beta*tokens, "
                              "tile_* on tiles only"},
        "approximated_families": APPROXIMATED,
        "png": png,
    }
    if not args.no_flops:
        result["compiled_flops"] = {"seq_len": 2048 if args.quick else 4096, "cp": args.cp,
                                    "families": compiled_flops(2048 if args.quick else 4096, args.cp)}
    if args.kernel_ranks:  # planner blocks of 32, below every kernel's tile
        result["kernel_rank_balance"] = kernel_rank_balance(length=2048, block=32, kernels=ALL_KERNELS)
    if args.kernel_tiles:
        result["kernel_tile_plans"] = kernel_tile_plans(repeats=3 if args.quick else 5)
    if args.auto_block:
        result["auto_block"] = auto_block_costs()  # a few seconds: the same under --quick
    result["wall_s"] = time.perf_counter() - t0
    report(result, args.out)


if __name__ == "__main__":
    main()
