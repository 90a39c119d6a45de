"""Training throughput on one CPU device: our JAX train step against PyTorch transformers, plus MFU vs a matmul.

    python benchmarks/throughput.py --out throughput.json [--quick] [--dtypes float32,bfloat16]

The model is the recipe configs/vlm_small.gin (a 6-layer ViT 224/16 of width 384, an MLP projector, an 8-layer
Llama-style LLM of width 512; sequence 512, batch 8; everything trains). The JAX side is the project's own training
step (mllm_jax.train.step.make_train_step, jitted and donated exactly as mllm_jax.train.loop.run does it) on a batch
from the synthetic data pipeline. The PyTorch side is transformers' LlavaForConditionalGeneration from random
CLIPVisionConfig + LlamaConfig of the same sizes, AdamW over every parameter with the same global-norm clipping, on
the same token ids, labels and pixels.

What is timed: a step (forward, backward, clipping, AdamW update) after warm-up steps, both frameworks alternating
round by round within this run (so load from other processes hits both alike), median over rounds. Each framework
lives in its own worker process (both in one process, the idle framework's thread pool slowed the other's steps)
and runs only while the other waits. torch uses torch.set_num_threads(os.cpu_count()); XLA uses every core. Tokens per step = batch x sequence (every position is
computed by both, padding included).

MFU: model FLOPs per step / step time, divided by the FLOP/s of a jitted 2048x2048 float32 jnp.dot measured in the
same process right after each timed step (torch's torch.mm rate, measured the same way, and torch's MFU are reported
too, and ``jax_mfu_vs_best_matmul``: against the faster of the two probes); medians over rounds. Model FLOPs are counted analytically: 6 x (matmul
parameters) x (tokens they see) for forward + backward, plus attention's two S x S matmuls (4 S^2 D per layer forward,
x3 with backward, full S^2). torch computes the full S^2; our LLM attention on CPU (kernels.tiled) computes
only the 128 x 128 tiles the mask does not rule out, so ``jax_mfu_vs_matmul_tiles_computed`` is reported beside
the MFU: the same, with the LLM attention FLOPs counted only over those tiles (``llm_attention_tiles_computed``,
from the batch's block map). XLA's cost_analysis of the compiled step is reported beside it (it also counts
elementwise work and the optimizer, and a scanned layer once).

XLA CPU flags must be set before jax starts, so this script sets them in its own process: train.py's
(mllm_jax.cpu_flags), plus --xla_flags (which wins where both name a flag).

The final line printed (and written to --out) is one JSON object with ``tokens_per_s``, ``torch_tokens_per_s``,
``speedup_vs_torch`` and ``mfu_vs_matmul`` (float32 against float32) and the details.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import signal
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT]

RECIPE = "configs/vlm_small.gin"
# A model small enough for a smoke run of the whole script in seconds (the test's --quick).
QUICK_PARAMS = (
    "LLMConfig.d_model = 64", "LLMConfig.n_layers = 2", "LLMConfig.n_heads = 4", "LLMConfig.n_kv_heads = 4",
    "LLMConfig.d_ff = 128", "LLMConfig.vocab_size = 128", "VisionConfig.image_size = 32",
    "VisionConfig.patch_size = 8", "VisionConfig.d_model = 32", "VisionConfig.n_layers = 2",
    "VisionConfig.n_heads = 2", "VisionConfig.d_ff = 64", "DataConfig.batch_size = 2", "DataConfig.seq_len = 64",
)
DEFAULT_XLA_FLAGS = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="write the final JSON object here")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    p.add_argument("--dtypes", default="float32", help="compute dtypes to compare, comma separated (float32, bfloat16)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (each: one JAX step, one torch step)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per framework before timing")
    p.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS, help="XLA_FLAGS for this process (set before jax)")
    p.add_argument("--gin_param", action="append", default=[], help="extra gin binding (repeatable)")
    p.add_argument("--no_torch", action="store_true", help="JAX side only (profiling)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mllm_jax import cpu_flags

    cpu_flags.apply()  # train.py's XLA:CPU flags (those --xla_flags names itself are kept as given)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._report import report  # noqa: E402
from mllm_jax.data import SyntheticBatches  # noqa: E402
from mllm_jax.train import loop  # noqa: E402
from mllm_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from mllm_jax.train.step import make_train_step  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def model_flops(cfg: loop.RunConfig) -> dict:
    """Analytic training FLOPs of one step: 6 x matmul parameters x tokens + attention (forward x 3), per part."""
    mc, dc = cfg.model, cfg.data
    b, s = dc.batch_size, dc.seq_len
    llm = mc.llm
    d, hd = llm.d_model, llm.resolved_head_dim
    attn_params = d * hd * (2 * llm.n_heads + 2 * llm.n_kv_heads)
    mlp_params = 3 * d * llm.d_ff
    llm_matmul = llm.n_layers * (attn_params + mlp_params) + d * llm.vocab_size  # + lm_head (embedding is a gather)
    llm_attn_fwd = llm.n_layers * 4 * b * s * s * llm.n_heads * hd
    out = {"llm": 6 * llm_matmul * b * s + 3 * llm_attn_fwd}
    images = b * dc.samples_per_row * dc.max_images
    for name, enc in mc.encoders.items():
        t = enc.num_positions
        ed = enc.d_model
        layer = 4 * ed * ed + 2 * ed * enc.d_ff
        patch = enc.patch_size**2 * enc.num_channels * ed
        enc_matmul_tokens = enc.n_layers * layer * images * t + patch * images * enc.num_patches
        enc_attn_fwd = enc.n_layers * 4 * images * t * t * ed
        out[f"encoders/{name}"] = 6 * enc_matmul_tokens + 3 * enc_attn_fwd
        pc = mc.projectors[name]
        hidden = pc.hidden_dim or d
        out[f"projectors/{name}"] = 6 * (ed * hidden + hidden * d) * images * enc.num_features
    out["total"] = sum(out.values())
    out["llm_attention"] = 3 * llm_attn_fwd  # included in "llm"
    return out


def llm_attention_tiles_computed(cfg: loop.RunConfig, batch: dict) -> float:
    """Fraction of the LLM's attention tiles our CPU path computes on ``batch`` (1.0 where it takes a dense path)."""
    from mllm_jax import kernels
    from mllm_jax.kernels.meta import SKIP, TokenMeta, block_map
    from mllm_jax.kernels.tiled import default_block

    s = cfg.data.seq_len
    if jax.default_backend() != "cpu" or kernels.choose(cfg.model.attention_impl, s) != "tiled":
        return 1.0
    mb = jax.tree.map(lambda x: np.asarray(x[0]), batch)  # the one microbatch
    meta = TokenMeta(mb["positions"], mb["segment_ids"], mb["span_ids"])
    block = default_block(s)
    fractions = [float(np.mean(block_map(meta, meta, block, block, window=w, span_isolated=cfg.model.span_isolated)
                               != SKIP)) for w in layer_windows(cfg.model.llm)]
    return float(np.mean(fractions))


def layer_windows(llm) -> list:
    from mllm_jax.llm import layer_window

    return [layer_window(llm, i) for i in range(llm.n_layers)]


# ----------------------------------------------------------------------------------------------------------------
# The JAX side: the project's train step


def load_config(quick: bool, dtype: str, extra=()) -> loop.RunConfig:
    params = list(QUICK_PARAMS if quick else ()) + [f"ModelConfig.dtype = '{dtype}'"] + list(extra)
    return loop.load_run_config([os.path.join(_ROOT, RECIPE)], params)


def host_batch(cfg: loop.RunConfig) -> dict:
    """One global batch [1, B, ...] (one microbatch) from the synthetic pipeline train.py uses."""
    return SyntheticBatches(cfg.model, cfg.data, microbatches=cfg.parallel.microbatches).batch_at(0)


class JaxTrainer:
    """The jitted, donated train step of mllm_jax.train.loop.run on a one-device mesh."""

    def __init__(self, cfg: loop.RunConfig, batch: dict):
        loop.validate(cfg, 1)
        from mllm_jax.parallel.mesh import make_mesh

        self.mesh = make_mesh(cfg.parallel, devices=jax.devices()[:1])  # one device, however many the process has
        with jax.set_mesh(self.mesh):
            model = loop.create_model(cfg, self.mesh)
            trainable = loop.trainable_filter(cfg.model)
            schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
            optimizer = loop.make_nnx_optimizer(model, make_optimizer(cfg.optimizer, cfg.train.steps), trainable)
            self.n_trainable = loop._count(nnx.state(model, trainable))
            graphdef, self.state = nnx.split((model, optimizer))
            shardings = jax.tree.map(lambda x: x.sharding, self.state)
            self.step_fn = jax.jit(make_train_step(graphdef, trainable, schedule=schedule),
                                   out_shardings=(shardings, None), donate_argnums=0)
            self.batch = loop.put_batch(batch, self.mesh, leading=1)
            t0 = time.perf_counter()
            self.compiled = self.step_fn.lower(self.state, self.batch).compile()
            self.compile_s = time.perf_counter() - t0

    def cost_flops(self) -> float | None:
        cost = self.compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        return float(cost["flops"]) if cost and "flops" in cost else None

    def step(self) -> float:
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.compiled(self.state, self.batch)
            loss = float(metrics["loss"])
            jax.block_until_ready(self.state)
        return loss


class JaxMatmul:
    """A jitted n x n float32 jnp.dot; ``rate()`` = its FLOP/s (median over ``repeats`` calls)."""

    def __init__(self, n: int, repeats: int):
        self.n, self.repeats = n, repeats
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.f = jax.jit(jnp.dot)
        self.f(self.a, self.b).block_until_ready()

    def rate(self) -> float:
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            self.f(self.a, self.b).block_until_ready()
            times.append(time.perf_counter() - t0)
        return 2 * self.n**3 / statistics.median(times)


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch side: transformers' LLaVA of the same sizes


class TorchTrainer:
    def __init__(self, cfg: loop.RunConfig, batch: dict, dtype: str):
        import torch
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        self.torch = torch
        mc, llm = cfg.model, cfg.model.llm
        enc = mc.encoders["vision"]
        vision = CLIPVisionConfig(hidden_size=enc.d_model, intermediate_size=enc.d_ff, num_hidden_layers=enc.n_layers,
                                  num_attention_heads=enc.n_heads, image_size=enc.image_size,
                                  patch_size=enc.patch_size, num_channels=enc.num_channels, hidden_act="gelu")
        text = LlamaConfig(vocab_size=llm.vocab_size, hidden_size=llm.d_model, intermediate_size=llm.d_ff,
                           num_hidden_layers=llm.n_layers, num_attention_heads=llm.n_heads,
                           num_key_value_heads=llm.n_kv_heads, max_position_embeddings=llm.max_position_embeddings,
                           rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta, tie_word_embeddings=False)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=mc.placeholder_ids["vision"],
                             image_seq_length=enc.num_features, projector_hidden_act="gelu",
                             vision_feature_select_strategy="default", vision_feature_layer=-1)
        torch.manual_seed(0)
        self.model = LlavaForConditionalGeneration(config)
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        oc = cfg.optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=oc.learning_rate, betas=(oc.b1, oc.b2), eps=oc.eps,
                                     weight_decay=oc.weight_decay)
        # the same warmup + cosine learning rate as mllm_jax.train.optimizer (optax's warmup_cosine_decay_schedule)
        total = cfg.train.steps
        warm = min(oc.warmup_steps, total)
        decay = max(total, warm + 1)
        end = oc.learning_rate * oc.end_lr_ratio

        def factor(step):
            if step < warm:
                return step / warm
            frac = min(step - warm, decay - warm) / (decay - warm)
            return (end + (oc.learning_rate - end) * 0.5 * (1 + math.cos(math.pi * frac))) / oc.learning_rate

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.clip = oc.grad_clip_norm
        self.autocast = dtype == "bfloat16"
        mb = jax.tree.map(lambda x: x[0], batch)  # the one microbatch
        labels = np.full_like(mb["labels"], -100)
        labels[:, 1:] = mb["labels"][:, :-1]  # ours are shifted on the host; transformers shifts inside its loss
        self.inputs = dict(
            input_ids=torch.from_numpy(np.asarray(mb["input_ids"], np.int64)),
            attention_mask=torch.from_numpy(np.asarray(mb["segment_ids"] != 0, np.int64)),
            pixel_values=torch.from_numpy(np.ascontiguousarray(np.transpose(mb["encoder_inputs"]["vision"],
                                                                            (0, 3, 1, 2)))),
            labels=torch.from_numpy(np.asarray(labels, np.int64)),
        )

    def step(self) -> float:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**self.inputs).loss
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())


class TorchMatmul:
    def __init__(self, n: int, repeats: int):
        import torch

        self.torch, self.n, self.repeats = torch, n, repeats
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(self.a, self.b)

    def rate(self) -> float:
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            self.torch.mm(self.a, self.b)
            times.append(time.perf_counter() - t0)
        return 2 * self.n**3 / statistics.median(times)


# ----------------------------------------------------------------------------------------------------------------
# The run


def _worker(framework: str, quick: bool, dtype: str, gin_params: list, matmul: tuple, conn) -> None:
    """One framework in its own process (so neither framework's thread pool competes with the other's inside one
    process): builds its trainer and matmul probe, then per "step" message runs one timed step followed by the
    probe and sends back (step seconds, loss, matmul FLOP/s)."""
    try:
        _serve(framework, quick, dtype, gin_params, matmul, conn)
    except BaseException as e:  # reported to the parent, which stops the benchmark naming this worker
        import traceback

        try:
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()[-4000:]))
        except OSError:
            pass
        raise


def _serve(framework: str, quick: bool, dtype: str, gin_params: list, matmul: tuple, conn) -> None:
    cfg = load_config(quick, dtype, gin_params)
    batch = host_batch(cfg)
    if framework == "jax":
        trainer, probe = JaxTrainer(cfg, batch), JaxMatmul(*matmul)
        info = {"compile_s": trainer.compile_s, "xla_cost_flops_per_step": trainer.cost_flops(),
                "trainable_params": trainer.n_trainable}
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        trainer, probe = TorchTrainer(cfg, batch, dtype), TorchMatmul(*matmul)
        info = {"params": trainer.n_params, "threads": torch.get_num_threads()}
    conn.send(info)
    while conn.recv() == "step":
        t0 = time.perf_counter()
        loss = trainer.step()
        conn.send((time.perf_counter() - t0, loss, probe.rate()))


def time_interleaved(frameworks: list, quick: bool, dtype: str, gin_params: list, matmul: tuple, warmup: int,
                     rounds: int) -> tuple[dict, dict]:
    """Warm up each framework's worker, then per round one step of each (the order alternating by round, so neither
    always runs first and load from other processes hits both alike). Returns (info, samples) per framework."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = {}
    for name in frameworks:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(name, quick, dtype, list(gin_params), matmul, child), daemon=True)
        proc.start()
        child.close()  # only the worker holds its end: its death is an EOF here, not an endless wait
        workers[name] = (proc, parent)

    def receive(name):
        """The worker's next message; a worker that raised or died is a RuntimeError naming it and its error."""
        proc, conn = workers[name]
        while not conn.poll(1.0):
            if not proc.is_alive() and not conn.poll(0):
                raise _worker_died(name, proc)
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            proc.join(timeout=5)
            raise _worker_died(name, proc) from None
        if isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "error":
            proc.join(timeout=5)
            raise RuntimeError(f"the {name} worker (pid {proc.pid}) failed: {msg[1]}\n{msg[2]}")
        return msg

    try:
        info = {name: receive(name) for name in workers}

        def step(name):
            workers[name][1].send("step")
            return receive(name)

        out = {name: {"times": [], "losses": [], "matmul": []} for name in frameworks}
        for name in frameworks:
            for _ in range(warmup):
                out[name]["losses"].append(step(name)[1])
        for r in range(rounds):
            for name in (frameworks if r % 2 == 0 else frameworks[::-1]):
                dt, loss, rate = step(name)
                out[name]["times"].append(dt)
                out[name]["losses"].append(loss)
                out[name]["matmul"].append(rate)
    finally:
        for proc, conn in workers.values():
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    return info, out


def _worker_died(name: str, proc) -> RuntimeError:
    code = proc.exitcode
    how = (f"killed by {signal.Signals(-code).name} (exit code {code})" if code is not None and code < 0
           else f"exit code {code}")
    return RuntimeError(f"the {name} worker (pid {proc.pid}) died without a result: {how}")


def load_average() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args) -> dict:
    warmup = args.warmup if args.warmup is not None else 1
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    matmul_n, matmul_repeats = (256, 3) if args.quick else (2048, 5)
    threads = os.cpu_count()
    frameworks = ["jax"] if args.no_torch else ["jax", "torch"]
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), "cpu_count": threads,
              "load_average_start": load_average(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "recipe": RECIPE, "quick": args.quick, "warmup_steps": warmup, "timed_rounds": rounds,
              "gin_params": args.gin_param,
              "tokens_counted": "batch x seq_len (every position, padding included, is computed by both)"}
    if not args.no_torch:
        import torch
        import transformers

        result.update(torch=torch.__version__, transformers=transformers.__version__)
    per_dtype = {}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        cfg = load_config(args.quick, dtype, args.gin_param)
        tokens = cfg.data.batch_size * cfg.data.seq_len
        flops = model_flops(cfg)
        info, timed = time_interleaved(frameworks, args.quick, dtype, args.gin_param, (matmul_n, matmul_repeats),
                                       warmup, rounds)
        r = {"batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "tokens_per_step": tokens,
             "model_flops_per_step": flops, "jax_compile_s": info["jax"]["compile_s"],
             "jax_xla_cost_flops_per_step": info["jax"]["xla_cost_flops_per_step"],
             "jax_trainable_params": info["jax"]["trainable_params"], "matmul_n": matmul_n}
        for name, t in timed.items():
            med = statistics.median(t["times"])
            r[f"{name}_step_s"] = med
            r[f"{name}_step_s_all"] = t["times"]
            r[f"{name}_tokens_per_s"] = tokens / med
            r[f"{name}_loss_first_last"] = [t["losses"][0], t["losses"][-1]]
            r[f"{name}_matmul_flops_per_s"] = statistics.median(t["matmul"])
            r[f"{name}_model_flops_per_s"] = flops["total"] / med
        r["jax_mfu_vs_matmul"] = r["jax_model_flops_per_s"] / r["jax_matmul_flops_per_s"]
        frac = llm_attention_tiles_computed(cfg, host_batch(cfg))
        r["llm_attention_tiles_computed"] = frac
        computed = flops["total"] - (1.0 - frac) * flops["llm_attention"]
        r["jax_mfu_vs_matmul_tiles_computed"] = computed / r["jax_step_s"] / r["jax_matmul_flops_per_s"]
        if "torch" in timed:
            r["torch_params"] = info["torch"]["params"]
            r["torch_threads"] = info["torch"]["threads"]
            r["speedup_vs_torch"] = r["torch_step_s"] / r["jax_step_s"]
            r["torch_mfu_vs_matmul"] = r["torch_model_flops_per_s"] / r["torch_matmul_flops_per_s"]
            # Against the faster of the two probes: XLA's flags (mllm_jax.cpu_flags) trade a lone big matmul's rate
            # for the train step's, so its own probe alone would flatter the MFU.
            best = max(r["jax_matmul_flops_per_s"], r["torch_matmul_flops_per_s"])
            r["jax_mfu_vs_best_matmul"] = r["jax_model_flops_per_s"] / best
        per_dtype[dtype] = r
    result["per_dtype"] = per_dtype
    main = per_dtype.get("float32") or next(iter(per_dtype.values()))
    result.update(tokens_per_s=main["jax_tokens_per_s"], torch_tokens_per_s=main.get("torch_tokens_per_s"),
                  speedup_vs_torch=main.get("speedup_vs_torch"), mfu_vs_matmul=main["jax_mfu_vs_matmul"],
                  load_average_end=load_average())
    return result


def main():
    try:
        result = run(ARGS)
    except RuntimeError as e:  # a worker failed: say so and exit non-zero (never wait forever)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    report(result, ARGS.out)


if __name__ == "__main__":
    main()
