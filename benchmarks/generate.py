"""Generation: our KV-cache decode against transformers' generate on CPU, and the compiled per-token decode cost of
llava_7b on a TPU target.

    python benchmarks/generate.py --out generate.json [--quick] [--no_tpu] [--target tpu:v5e:1x1]

1. CPU, side by side in one run: one Llama-style LLM (random weights), exported with mllm_jax.hf.export and loaded
   by transformers, so both run the same weights on the same left-padded prompts of different lengths; greedy, no
   stop token, ``max_new_tokens`` each. Each side is timed after a warm-up call (our compile excluded; its time is
   reported apart). tokens_per_s = rows x new tokens / wall time of the whole generate (prefill included).
   ``same_tokens``: whether both produced the same greedy tokens.
2. TPU (deviceless: libtpu compiles for the target without the chip, mllm_jax.train.targets): one decode step
   (mllm_jax.decode.decode_step: one token per row against a static cache) of configs/llava_7b.gin's LLM with bf16
   weights as served, compiled for the target; FLOPs and bytes accessed from compiled.cost_analysis(), memory from
   compiled.memory_analysis(), and the roofline time per step max(FLOPs / peak, bytes / HBM bandwidth).

Prints one JSON line (ours_tokens_per_s, hf_tokens_per_s, speedup_vs_hf, tpu_decode, ...) and writes it to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import report  # noqa: E402


def cpu_comparison(*, d_model: int, n_layers: int, vocab: int, rows: int, prompt: int, new_tokens: int,
                   repeats: int) -> dict:
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from mllm_jax import decode
    from mllm_jax.config import LLMConfig
    from mllm_jax.hf.export import export
    from mllm_jax.llm import LLM

    cfg = LLMConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=d_model // 64,
                    n_kv_heads=max(1, d_model // 256), d_ff=4 * d_model, max_position_embeddings=4096)
    llm = LLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = [prompt - (i * prompt) // (2 * rows) for i in range(rows)]  # prompt .. prompt/2 tokens
    prompts = [rng.integers(3, vocab, n) for n in lengths]
    batch = decode.text_batch(prompts)

    t0 = time.perf_counter()
    decode.generate(llm, batch, max_new_tokens=new_tokens)  # compile + first run
    first = time.perf_counter() - t0
    ours_t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = decode.generate(llm, batch, max_new_tokens=new_tokens)
        ours_t.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as d:
        export(llm, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    width = max(lengths)
    ids = np.zeros((rows, width), np.int64)
    mask = np.zeros((rows, width), np.int64)
    for i, p in enumerate(prompts):  # left padding, as transformers wants for decoder-only generate
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(**kw)  # warm-up
        hf_t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf_out = hf.generate(**kw)
            hf_t.append(time.perf_counter() - t0)
    hf_tokens = hf_out[:, width:].numpy()
    n = rows * new_tokens
    ours_s, hf_s = min(ours_t), min(hf_t)
    return {
        "ours_tokens_per_s": n / ours_s,
        "hf_tokens_per_s": n / hf_s,
        "speedup_vs_hf": hf_s / ours_s,
        "same_tokens": bool(np.array_equal(hf_tokens, ours.tokens)),
        "ours_first_call_s": first,
        "cpu_model": {"d_model": d_model, "n_layers": n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                      "vocab": vocab, "rows": rows, "prompt_tokens": lengths, "new_tokens": new_tokens,
                      "timing": f"best of {repeats} whole generate calls after a warm-up",
                      "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__},
    }


def tpu_decode(target_text: str, *, n_layers: int | None, batch: int, cache_len: int | None) -> dict:
    """The compiled cost of one decode step of configs/llava_7b.gin's LLM on ``target_text``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mllm_jax import decode
    from mllm_jax.llm import LLM
    from mllm_jax.parallel.mesh import MESH_AXES
    from mllm_jax.train import targets
    from mllm_jax.train.compile_target import _cost, compile_on_target
    from mllm_jax.train.loop import load_run_config

    params = [f"LLMConfig.n_layers = {n_layers}"] if n_layers else []
    cfg = load_run_config(["configs/llava_7b.gin"], params)
    # Unrolled layers: XLA's cost analysis counts a loop body once, so a scanned stack would count one layer.
    llm_cfg, run = cfg.model.llm, dataclasses.replace(cfg.model.run_settings(), layer_loop="unrolled")
    cache_len = cache_len or cfg.data.seq_len
    target = targets.parse(target_text)
    devices = target.devices()[:1]
    mesh = jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Explicit,) * len(MESH_AXES))
    one = NamedSharding(mesh, P())

    def sds(x, dtype=None):
        return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=one)

    abstract = nnx.eval_shape(lambda: LLM(llm_cfg, rngs=nnx.Rngs(0), run=run))
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda x: sds(x, jnp.bfloat16), state)  # weights as served: bf16
    cache = jax.eval_shape(lambda: decode.init_cache(abstract, batch, cache_len))
    cache = jax.tree.map(sds, cache)
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=one)

    def step(state, tokens, cache):
        return decode.decode_step(nnx.merge(graphdef, state), tokens, cache)

    jitted = jax.jit(step, donate_argnums=2)
    compiled, seconds, lowered = compile_on_target(jitted, (state, tokens, cache), mesh,
                                                   what=f"llava_7b decode step on {target.topology}")
    cost = _cost(compiled, lowered)
    mem = compiled.memory_analysis()
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    chip = target.chip
    weight_bytes = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(state))
    cache_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
    roofline = max(flops / chip.peak_flops, nbytes / chip.hbm_bandwidth)
    return {
        "target": target.topology, "recipe": "configs/llava_7b.gin (its LLM)",
        "n_layers": llm_cfg.n_layers, "n_layers_of_recipe": 32 if not n_layers else "reduced",
        "layer_loop": "unrolled (every layer counted)", "batch": batch, "cache_len": cache_len, "weights_dtype": "bfloat16", "compute_dtype": run.dtype,
        "flops_per_step": flops, "bytes_accessed_per_step": nbytes,
        "flops_per_token": flops / batch, "bytes_per_token": nbytes / batch,
        "weight_bytes": weight_bytes, "kv_cache_bytes": cache_bytes,
        "memory_argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
        "memory_output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
        "memory_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
        "memory_alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
        "hbm_bytes": chip.hbm_bytes,
        "roofline_step_s": roofline, "roofline_tokens_per_s": batch / roofline if roofline else None,
        "bound": "memory" if nbytes / chip.hbm_bandwidth >= flops / chip.peak_flops else "compute",
        "compile_s": seconds,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="a smaller CPU model and fewer tokens")
    parser.add_argument("--no_tpu", action="store_true", help="skip the deviceless TPU compile")
    parser.add_argument("--target", default="tpu:v5e:1x1")
    parser.add_argument("--tpu_layers", type=int, default=0, help="LLM layers for the TPU compile (0: the recipe's)")
    parser.add_argument("--tpu_batch", type=int, default=1)
    parser.add_argument("--cache_len", type=int, default=0, help="0: the recipe's seq_len")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.quick:
        sizes = dict(d_model=128, n_layers=2, vocab=512, rows=4, prompt=32, new_tokens=32, repeats=2)
    else:
        sizes = dict(d_model=512, n_layers=4, vocab=4096, rows=4, prompt=128, new_tokens=64, repeats=3)
    result = {"benchmark": "generate", "machine": "2-core CPU VM, shared with other jobs"}
    result.update(cpu_comparison(**sizes))
    if not args.no_tpu:
        try:
            result["tpu_decode"] = tpu_decode(args.target, n_layers=args.tpu_layers or None, batch=args.tpu_batch,
                                              cache_len=args.cache_len or None)
        except Exception as e:  # noqa: BLE001 - reported, not hidden: the CPU numbers still stand
            result["tpu_decode"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"}
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
