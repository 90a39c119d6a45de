"""GPU wall time of our Pallas GPU (Triton) attention kernel against cuDNN and JAX's Pallas GPU attention, next to a
model of our kernel's time, over the multimodal mask families (issue 18).

    python benchmarks/attention_gpu.py --out attention_gpu.json [--sizes 8192,32768] [--budget_s 300]
    python benchmarks/attention_gpu.py --out smoke.json --interpret_smoke      # any machine: every code path, tiny

Per mask family (tests/mask_families.py) and S, Llama-3-8B attention shapes (32 query heads, 8 kv heads, head dim
128, bf16, batch 1), forward and forward+backward (value_and_grad of sum(out) w.r.t. q, k, v) wall time in ms: jit,
compiled and warmed up, block_until_ready, the median of --repeats runs, of
- "ours":   kernels.attention(impl="pallas_gpu") at pallas_gpu.default_blocks(.., "h100"); the metadata are traced
            arguments (as in training), so the block map and its compaction are inside the timed function;
- "cudnn":  jax.nn.dot_product_attention(implementation="cudnn"): the causal family with is_causal=True (cuDNN's own
            causal mask); every other family with the family's dense mask as an additive bias [1, 1, S, S] (0 / -2^41,
            what jax makes of a bool mask for cuDNN) built before timing (cuDNN has no span or segment mask): the
            exact mask, but a dense S x S kernel with no tile skipping, and cuDNN's backward also writes dbias;
- "anchor": jax.experimental.pallas.ops.gpu.attention.mha (JAX's Pallas GPU attention) at its default blocks. No
            GQA (K/V are repeated to the query heads before timing; the repeat and the group sum of dK/dV are not
            timed), and only causal and segment-id masks: every family runs causal (packed: causal + segment ids),
            the nearest mask it supports, not the family's (images' bidirectional spans are not expressible).
One case is (family, S, implementation); a case that raises records its error string and the run goes on. Unless
--in_process, the cases run in a worker process that the driver restarts past a case that exceeds --case_timeout_s
(recorded as timed out) or crashes, so the run never hangs (a worker that dies before its first case, e.g. on an
import, ends the run with that error on every case); cases left when --budget_s has passed are recorded as skipped.
The driver rewrites --out after every case ("partial": true until the end), so a run cut short keeps its numbers.

Next to each time, a MODEL of our kernel (not a measurement), from its tile lists and block specs:

    t = live tiles x tile FLOPs / peak tensor-core FLOP/s + bytes / HBM bandwidth     (train/targets.CHIPS["h100"])

live tiles per query head from meta.block_map (the kernel's loops visit exactly those); tile FLOPs 4 / 6 / 8 x
bq x bk x D for the forward, dQ and dK/dV passes (pallas_tpu.TILE_FLOPS); bytes: K/V (forward, dQ) or q, dO, lse,
delta (dK/dV) per live tile and query head, plus each program's resident blocks, counted as if nothing stays in L2
(the 4 query heads of a kv head re-read its K/V from HBM), so the byte term is an upper bound. It leaves out the
metadata loads, the backward's delta einsum and the block map computation.

Final JSON: device, backend, gpu_ms[family]["impl@S"] = {fwd, fwd_bwd} (ms) or an error string,
model_ms[family][S] = {fwd, fwd_bwd, flops_ms, bytes_ms}, measured_over_model[family@S] = {fwd, fwd_bwd},
speedup_vs_cudnn[family@S] and speedup_vs_pallas_anchor[family@S] = {fwd, fwd_bwd} (their time / ours),
max_abs_err[family@S] (our forward against cuDNN's on the rows that attend something; with --interpret_smoke also
against kernels.reference, and the anchor against the reference on the causal family where its mask is exact).

--interpret_smoke (any backend): tiny sizes in float32, our kernel and the anchor in Pallas interpret mode, cuDNN
replaced by jax.nn.dot_product_attention(implementation="xla") with the same masks: the suite's test of this script.
Without it the script refuses to run on a backend other than GPU and names the backend.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._report import report  # noqa: E402
from benchmarks.attention import TPU_SHAPES, modelled_s  # noqa: E402
from mask_families import FAMILIES, make_meta  # noqa: E402
from mllm_jax import kernels  # noqa: E402
from mllm_jax.kernels.meta import SKIP, TokenMeta, block_map, mask  # noqa: E402
from mllm_jax.kernels.pallas_gpu import default_blocks  # noqa: E402

IMPLS = ("ours", "cudnn", "anchor")
MODEL_CHIP = "h100"
LLAMA_SHAPES = TPU_SHAPES  # Llama-3-8B attention: 32 query heads, 8 kv heads, head dim 128
GPU_RUN = dict(**LLAMA_SHAPES, sizes=(8192, 32768), dtype="bfloat16", repeats=5, warmup=1, blocks=None, smoke=False)
# Smoke: 4x4 tiles of 16 at S=64 so the block map has skipped, partial and full tiles; f32 for a 1e-4 check.
SMOKE_RUN = dict(hq=4, hkv=2, head_dim=16, sizes=(64,), dtype="float32", repeats=2, warmup=0, blocks=(16, 16),
                 smoke=True)
_LINE = "@@attention_gpu "  # prefix of the worker's protocol lines on stdout


# ------------------------------------------------------------------------------------------------------------- model


def _blocks(cfg, s):
    return tuple(cfg["blocks"]) if cfg["blocks"] else default_blocks(s, s, cfg["head_dim"], MODEL_CHIP)


def gpu_passes(bmap_QK: np.ndarray, bq: int, bk: int, hq: int, hkv: int, d: int, itemsize: int) -> dict:
    """Our three Triton kernels on one head's block map [nQ, nK], from their grids and block specs (pallas_gpu):
    per pass, the tiles computed (all query heads) and the HBM bytes (no L2 reuse). steps = 0: a GPU program loops
    over its tile list, there is no per-step overhead as on the TPU."""
    nq, nk = bmap_QK.shape
    live = int((bmap_QK != SKIP).sum())
    q_blk, kv_blk, rows = bq * d * itemsize, bk * d * itemsize, bq * 4  # a row vector (lse, delta) is f32
    return {
        # grid (nQ, B, Hq): per live tile K and V; per program q in, o and lse out.
        "fwd": dict(steps=0, computed=hq * live, bytes=hq * (live * 2 * kv_blk + nq * (2 * q_blk + rows))),
        # grid (nQ, B, Hq): per live tile K and V; per program q, dO, lse, delta in and dQ out.
        "dq": dict(steps=0, computed=hq * live, bytes=hq * (live * 2 * kv_blk + nq * (3 * q_blk + 2 * rows))),
        # grid (nK, B, Hkv), looping over the G query heads: per live tile and head q, dO, lse, delta; per program
        # K, V in and dK, dV out.
        "dkv": dict(steps=0, computed=hq * live, bytes=hq * live * (2 * q_blk + 2 * rows) + hkv * nk * 4 * kv_blk),
    }


def model_ms(cfg: dict, family: str, s: int) -> dict:
    """The model of our kernel on ``family`` at S = ``s`` (see the module docstring), in ms."""
    from mllm_jax.kernels.pallas_tpu import TILE_FLOPS
    from mllm_jax.train.targets import CHIPS

    chip = CHIPS[MODEL_CHIP]
    bq, bk = _blocks(cfg, s)
    meta = make_meta(family, 1, s, seed=s)
    bmap = np.asarray(block_map(meta, meta, bq, bk))[0]
    d, itemsize = cfg["head_dim"], np.dtype(cfg["dtype"]).itemsize
    passes = gpu_passes(bmap, bq, bk, cfg["hq"], cfg["hkv"], d, itemsize)
    flops = sum(TILE_FLOPS[k] * p["computed"] * bq * bk * d for k, p in passes.items())
    return {
        "fwd": 1e3 * modelled_s({"fwd": passes["fwd"]}, bq, bk, d, chip),
        "fwd_bwd": 1e3 * modelled_s(passes, bq, bk, d, chip),
        "flops_ms": 1e3 * flops / chip.peak_flops,
        "bytes_ms": 1e3 * sum(p["bytes"] for p in passes.values()) / chip.hbm_bandwidth,
        "live_tiles_per_head": int((bmap != SKIP).sum()),
        "tiles_per_head": int(bmap.size),
        "blocks": [bq, bk],
    }


# ------------------------------------------------------------------------------------------------------------ timing


def median_ms(fn, args, repeats: int, warmup: int) -> float:
    """Median wall time (ms) of ``fn(*args)`` to block_until_ready, after a compile run and ``warmup`` runs."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def find_anchor():
    """JAX's Pallas GPU flash attention as the installed jax provides it: (qualified name, mha)."""
    from jax.experimental.pallas.ops.gpu import attention as anchor

    return f"{anchor.__name__}.mha", anchor.mha


_JITTED: dict = {}  # (impl, variant, S) -> (fwd, fwd_bwd): families share a compilation (their masks are arguments)


def _jitted(key, attn):
    """jitted forward and value_and_grad(sum(out)) w.r.t. q, k, v of attn(q, k, v, *rest), once per ``key``."""
    if key not in _JITTED:
        loss = lambda q, k, v, *rest: jnp.sum(attn(q, k, v, *rest).astype(jnp.float32))  # noqa: E731
        _JITTED[key] = jax.jit(attn), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return _JITTED[key]


def _impl(impl: str, cfg: dict, family: str, s: int):
    """((fwd, fwd_bwd) jitted, extra args built before timing, mask description, how many times K/V are repeated
    along heads for it) of one implementation on one family at S = ``s``."""
    d, smoke = cfg["head_dim"], cfg["smoke"]
    meta = make_meta(family, 1, s, seed=s)
    if impl == "ours":
        bq, bk = _blocks(cfg, s)

        def ours(q, k, v, m):
            return kernels.attention(q, k, v, m, m, impl="pallas_gpu", interpret=smoke, block_q=bq, block_k=bk)

        return _jitted(("ours", "meta", s), ours), (TokenMeta(*(jnp.asarray(a) for a in meta)),), \
            f"the family's own (kernels.meta rule), blocks {bq}x{bk}", 1
    if impl == "cudnn":
        sdpa = "xla" if smoke else "cudnn"
        if family == "causal":
            def sdpa_causal(q, k, v):
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=sdpa)

            return _jitted(("cudnn", "causal", s), sdpa_causal), (), f"is_causal=True ({sdpa})", 1

        def sdpa_bias(q, k, v, bias):
            return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=sdpa)

        # The additive bias jax would make of a bool mask (0 / -2^41, its cuDNN-safe large negative), built here so
        # the conversion is not timed.
        dtype = jnp.dtype(cfg["dtype"])
        bias = jax.jit(lambda m: jnp.where(mask(m, m)[:, None], 0.0, -2.0**41).astype(dtype))(
            TokenMeta(*(jnp.asarray(a) for a in meta)))
        return _jitted(("cudnn", "bias", s), sdpa_bias), (bias,), \
            f"the family's dense mask as an additive bias [1, 1, S, S] ({sdpa})", 1
    if impl != "anchor":
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    _, mha = find_anchor()
    g = cfg["hq"] // cfg["hkv"]

    def anchor(q, k, v, *seg_ids):  # K/V come repeated to the query heads: the anchor has no GQA
        return mha(q, k, v, seg_ids[0] if seg_ids else None, sm_scale=1.0 / np.sqrt(d), causal=True,
                   interpret=smoke)

    if family == "packed":
        return _jitted(("anchor", "segment", s), anchor), (jnp.asarray(meta.segment_ids),), \
            f"causal + segment ids; K/V repeated {g}x (no GQA)", g
    return _jitted(("anchor", "causal", s), anchor), (), \
        f"causal (the nearest mask it supports); K/V repeated {g}x (no GQA)", g


def _inputs(cfg, s, seed=0):
    dtype = jnp.dtype(cfg["dtype"])
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = [(1, s, cfg["hq"], cfg["head_dim"])] + [(1, s, cfg["hkv"], cfg["head_dim"])] * 2
    return [jax.random.normal(kk, sh, jnp.float32).astype(dtype) for kk, sh in zip(keys, shapes)]


def _max_abs_err_on_seen_rows(got, want, meta):
    seen = np.asarray(jax.jit(lambda m: mask(m, m).any(-1))(TokenMeta(*(jnp.asarray(a) for a in meta))))[0]
    diff = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))[0]
    return float(jnp.max(jnp.where(jnp.asarray(seen)[:, None, None], diff, 0.0)))


def run_case(cfg: dict, family: str, s: int, impl: str) -> dict:
    """One case: forward and forward+backward median ms, the mask it used, and (ours; the anchor on the causal family
    in smoke mode) the output checks of the module docstring."""
    q, k, v = _inputs(cfg, s)
    (fwd, fwd_bwd), extra, mask_used, kv_repeat = _impl(impl, cfg, family, s)
    k, v = (jnp.repeat(x, kv_repeat, axis=2) for x in (k, v)) if kv_repeat > 1 else (k, v)
    args = (q, k, v, *extra)
    out = {"mask": mask_used,
           "fwd": median_ms(fwd, args, cfg["repeats"], cfg["warmup"]),
           "fwd_bwd": median_ms(fwd_bwd, args, cfg["repeats"], cfg["warmup"])}
    meta = make_meta(family, 1, s, seed=s)
    if cfg["smoke"] and (impl == "ours" or (impl == "anchor" and family == "causal")):
        from mllm_jax.kernels.reference import reference_attention

        m = TokenMeta(*(jnp.asarray(a) for a in meta))
        k0, v0 = (x[:, :, ::kv_repeat] for x in (k, v))  # the original heads
        want = reference_attention(q, k0, v0, m, m)
        out["max_abs_err_vs_reference"] = _max_abs_err_on_seen_rows(fwd(*args), want, meta)
    if impl == "ours":
        try:
            (sdpa, _), sdpa_extra, _, _ = _impl("cudnn", cfg, family, s)
            out["max_abs_err_vs_cudnn"] = _max_abs_err_on_seen_rows(fwd(*args), sdpa(q, k, v, *sdpa_extra), meta)
        except Exception as e:  # noqa: BLE001 - cuDNN refusing is a result, not a crash of ours
            out["max_abs_err_vs_cudnn"] = f"{type(e).__name__}: {e}"[:500]
    return out


def device_info(cfg: dict) -> dict:
    """The running device, or SystemExit naming the backend when it is not a GPU and this is no smoke run."""
    backend = jax.default_backend()
    if backend != "gpu" and not cfg["smoke"]:
        raise SystemExit(f"benchmarks/attention_gpu.py times GPU kernels, but jax's backend is {backend!r} "
                         f"(devices {jax.devices()}); run it on a GPU, or pass --interpret_smoke for the CPU smoke run")
    try:
        anchor = find_anchor()[0]
    except Exception as e:  # noqa: BLE001
        anchor = f"not found: {type(e).__name__}: {e}"
    return {"device": jax.devices()[0].device_kind, "backend": backend, "jax": jax.__version__, "anchor": anchor}


def run_cases(cfg: dict, cases: list, deadline: float, emit) -> None:
    """Run ``cases`` [(family, S, impl)] in order, calling emit(case, result) after each: the times, or
    {"error": ...} when it raised, or {"skipped": ...} once ``deadline`` (time.time()) has passed."""
    for case in cases:
        family, s, impl = case
        if time.time() > deadline:
            emit(case, {"skipped": "over --budget_s"})
            continue
        t = time.time()
        try:
            result = run_case(cfg, family, s, impl)
        except Exception as e:  # noqa: BLE001 - a failing implementation is a result
            traceback.print_exc(file=sys.stderr)
            result = {"error": f"{type(e).__name__}: {e}"[:800]}
        result["case_s"] = time.time() - t
        times = " ".join(f"{p} {result[p]:.3f} ms" for p in ("fwd", "fwd_bwd") if p in result)
        print(f"{family:12s} S={s:6d} {impl:6s} {times or result.get('error') or result.get('skipped')}",
              file=sys.stderr, flush=True)
        emit(case, result)


# ------------------------------------------------------------------------------------------------------------ driver


def _worker(spec: dict) -> None:
    """The worker process: device info, then one protocol line per case."""
    cfg = spec["cfg"]
    try:
        info = device_info(cfg)
    except SystemExit as e:
        print(_LINE + json.dumps({"refused": str(e)}), flush=True)
        sys.exit(2)
    print(_LINE + json.dumps({"info": info}), flush=True)
    run_cases(cfg, [tuple(c) for c in spec["cases"]], spec["deadline"],
              lambda case, r: print(_LINE + json.dumps({"case": case, "result": r}), flush=True))


def _pump(stream, into: queue.Queue) -> None:
    """Every line of ``stream`` into ``into``, then None at its end (a reader thread: the driver waits with a
    timeout on the queue, never on the pipe)."""
    for line in stream:
        into.put(line)
    into.put(None)


def run_in_workers(cfg: dict, cases: list, deadline: float, case_timeout_s: float,
                   progress=None) -> tuple[dict, dict]:
    """Run the cases in a worker process; a case that passes case_timeout_s without a result (or crashes the worker)
    is recorded as such and a fresh worker goes on with the rest. progress(info, results) after each case. Returns
    (device info, {case: result})."""
    results, info, pending = {}, {}, list(cases)
    while pending:
        if time.time() > deadline:  # a worker that timed out or crashed is not restarted past the budget
            results.update({c: {"skipped": "over --budget_s"} for c in pending})
            break
        spec = json.dumps({"cfg": cfg, "cases": pending, "deadline": deadline})
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", spec],
                                stdout=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        started = False
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        while pending:
            try:
                line = lines.get(timeout=case_timeout_s)
            except queue.Empty:
                proc.kill()
                proc.wait()
                results[pending.pop(0)] = {"error": f"timed out after --case_timeout_s={case_timeout_s:g} s"}
                if progress:
                    progress(info, results)
                break
            if line is None and not started:  # it died before reporting its device (an import, the GPU's start):
                rc = proc.wait()  # every fresh worker would too, so the run stops here (its stderr says why)
                results.update({c: {"error": f"worker process exited with rc={rc} before its first case"}
                                for c in pending})
                pending = []
                break
            if line is None:  # the worker ended before every case reported
                rc = proc.wait()
                results[pending.pop(0)] = {"error": f"worker process exited with rc={rc} during this case"}
                if progress:
                    progress(info, results)
                break
            if not line.startswith(_LINE):
                print(line, end="", file=sys.stderr)  # jax's own output; stdout is kept for the final JSON
                continue
            msg = json.loads(line[len(_LINE):])
            if "refused" in msg:
                proc.wait()
                raise SystemExit(msg["refused"])
            if "info" in msg:
                info, started = msg["info"], True
                continue
            case = tuple(msg["case"])
            results[case] = msg["result"]
            pending.remove(case)
            if progress:
                progress(info, results)
        else:
            proc.wait()
    return info, results


def assemble(cfg: dict, info: dict, results: dict) -> dict:
    """The final JSON (module docstring) from the cases' results."""
    families = sorted({c[0] for c in results}, key=list(FAMILIES).index)
    sizes = sorted({c[1] for c in results})
    gpu, model, ratio, vs_cudnn, vs_anchor, err, masks = {}, {}, {}, {}, {}, {}, {}
    for fam in families:
        gpu[fam], model[fam] = {}, {}
        for s in sizes:
            model[fam][str(s)] = m = model_ms(cfg, fam, s)
            row = {impl: results.get((fam, s, impl)) for impl in IMPLS}
            for impl, r in row.items():
                if r is None:
                    continue
                masks[f"{impl}:{fam}"] = r.get("mask", masks.get(f"{impl}:{fam}"))
                gpu[fam][f"{impl}@{s}"] = {p: r[p] for p in ("fwd", "fwd_bwd")} if "fwd_bwd" in r else \
                    r.get("error") or r.get("skipped")
            key, ours = f"{fam}@{s}", gpu[fam].get(f"ours@{s}")
            if isinstance(ours, dict):
                ratio[key] = {p: ours[p] / m[p] for p in ("fwd", "fwd_bwd")}
                for impl, into in (("cudnn", vs_cudnn), ("anchor", vs_anchor)):
                    theirs = gpu[fam].get(f"{impl}@{s}")
                    if isinstance(theirs, dict):
                        into[key] = {p: theirs[p] / ours[p] for p in ("fwd", "fwd_bwd")}
            e = {f"{impl}_vs_{ref}": row[impl][f"max_abs_err_vs_{ref}"] for impl in IMPLS for ref in
                 ("reference", "cudnn") if row[impl] and f"max_abs_err_vs_{ref}" in row[impl]}
            if e:
                err[key] = e
    smoke = cfg["smoke"]
    return {
        "device": info.get("device", "unknown (no case reported)"),
        "backend": info.get("backend"),
        "jax": info.get("jax"),
        "anchor": info.get("anchor"),
        "interpret_smoke": smoke,
        "note": ("SMOKE RUN: tiny sizes in float32 on " + str(info.get("backend")) + "; our kernel and the anchor in "
                 "Pallas interpret mode, cuDNN replaced by jax.nn.dot_product_attention(implementation='xla'): times "
                 "are not GPU times") if smoke else "GPU wall times; model_ms is a model, not a measurement",
        "gpu_ms": gpu,
        "model_ms": model,
        "measured_over_model": ratio,
        "speedup_vs_cudnn": vs_cudnn,
        "speedup_vs_pallas_anchor": vs_anchor,
        "max_abs_err": err,
        "mask_used": masks,
        "case_s": {f"{c[0]}@{c[1]}:{c[2]}": r.get("case_s") for c, r in results.items()},
        "model": f"t = live tiles x tile FLOPs / peak + bytes / HBM bandwidth, targets.CHIPS[{MODEL_CHIP!r}] "
                 "(bf16 dense peak, HBM bandwidth; bytes with no L2 reuse): a model, not a measurement",
        "config": {**cfg, "sizes": list(cfg["sizes"])},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where to write the final JSON")
    parser.add_argument("--sizes", help="comma-separated S (default 8192,32768; smoke 128)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated mask families")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {IMPLS}")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median; default 10, smoke 2)")
    parser.add_argument("--case_timeout_s", type=float, default=90.0,
                        help="a (family, S, impl) case with no result by then is recorded as timed out")
    parser.add_argument("--budget_s", type=float, default=240.0,
                        help="cases not started within this many seconds are recorded as skipped (the run ends "
                             "within about budget_s + case_timeout_s)")
    parser.add_argument("--interpret_smoke", action="store_true",
                        help="any backend: tiny sizes, interpret mode, cuDNN -> XLA (tests the script)")
    parser.add_argument("--in_process", action="store_true", help="no worker process (no per-case timeout)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _worker(json.loads(args._worker))
    if not args.out:
        parser.error("--out is required (where the final JSON is written)")
    cfg = dict(SMOKE_RUN if args.interpret_smoke else GPU_RUN)
    if args.sizes:
        cfg["sizes"] = tuple(int(x) for x in args.sizes.split(","))
    if args.repeats:
        cfg["repeats"] = args.repeats
    families, impls = args.families.split(","), args.impls.split(",")
    for name, got, allowed in (("--families", families, FAMILIES), ("--impls", impls, IMPLS)):
        if bad := [x for x in got if x not in allowed]:
            raise ValueError(f"{name} must be of {tuple(allowed)}; got {bad}")
    # Smaller S first: under the budget every family gets its short-sequence numbers before the long ones.
    cases = [(f, s, i) for s in sorted(cfg["sizes"]) for f in families for i in impls]
    deadline = time.time() + args.budget_s
    if args.in_process:
        info, results = device_info(cfg), {}
        run_cases(cfg, cases, deadline, lambda case, r: results.__setitem__(tuple(case), r))
    else:
        jax.config.update("jax_platforms", "cpu")  # the driver never takes the GPU from its worker

        def progress(info, results):  # --out holds the cases so far: a run cut short still leaves its numbers
            with open(args.out, "w") as f:
                f.write(json.dumps({**assemble(cfg, info, results), "partial": True}) + "\n")

        info, results = run_in_workers(cfg, cases, deadline, args.case_timeout_s, progress)
    result = {**assemble(cfg, info, results), "partial": False}
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
