"""--compile_only --target=T: the train step train.py would run, built from abstract arrays on a target's devices,
compiled by the target's own compiler (XLA:TPU + Mosaic from libtpu; XLA:GPU + Triton from the CUDA plugin), and
analysed: per-device memory against the chip's HBM, FLOPs and bytes, collectives, Pallas kernel calls, the roofline
step time and the model-FLOP utilisation that bound allows.

Nothing is allocated: the model and optimizer state come from ``nnx.eval_shape``, the batch is ``jax.ShapeDtypeStruct``s
with the NamedShardings mllm_jax.data.placement gives it, in the shapes of the run's data (microbatch axis, context
permutation padding). ``ModelConfig.attention_impl="auto"`` is resolved for the target (Pallas TPU / Pallas GPU), not
for this host.

Cost figures: ``cost_analysis()`` counts a while/scan body once. When the run's program has loops (layers in a
``lax.scan``, or several microbatches), the FLOPs and bytes come from a second compile of the same step with
``ModelConfig.layer_loop="unrolled"`` over one microbatch's rows, multiplied by the microbatch count (the optimizer
update is then counted once per microbatch: negligible against the model). The report says which (``cost_basis``).
Memory, collectives and Pallas calls are those of the run's own program (static counts: a loop body's ops once).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax.costs import step_model_flops
from mllm_jax.data import placement
from mllm_jax.data.context_batches import context_block, head_dim_of
from mllm_jax.parallel.config import AUTO
from mllm_jax.parallel.context import padded_length
from mllm_jax.train import loop
from mllm_jax.train.targets import GiB, Target

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Custom-call targets of Pallas kernels in compiled HLO: Mosaic (TPU) and Triton (GPU).
PALLAS_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")


class TargetCompileError(RuntimeError):
    """The target's compiler rejected the program (the message names the target, the layout and the compiler's
    first lines)."""


class DoesNotFitError(RuntimeError):
    """The program compiled (or the compiler ran out of memory) but does not fit in the chip's HBM."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def layout_name(pc) -> str:
    """'data=2 tensor=2 microbatches=1': the mesh axes of size > 1 and the microbatch count (and a pipeline's
    schedule when it is not 1F1B, its overlapped ppermutes when on)."""
    axes = [f"{a}={s}" for a, s in pc.axis_sizes.items() if s > 1] or ["1 device"]
    extra = []
    if pc.pipeline > 1 and pc.pipeline_schedule != "1f1b":
        extra.append(f"schedule={pc.pipeline_schedule}")
    if pc.pipeline > 1 and pc.pipeline_overlap_comm:
        extra.append("overlap_comm")
    return " ".join(axes + [f"microbatches={pc.microbatches}"] + extra)


def for_target(cfg: loop.RunConfig, target: Target, *, layer_loop: str | None = None) -> loop.RunConfig:
    """The run's config as it runs on ``target``: attention_impl "auto" resolved to the target's kernels, and
    ContextConfig.block "auto" to the block the run's hosts choose there (data.context_batches.context_block on the
    target's kernel tile, platform and chip), so the padded shapes are the target's, not this host's."""
    model = cfg.model
    if model.attention_impl == "auto":
        model = model.replace(attention_impl=target.attention_impl)
    if layer_loop is not None:
        model = model.replace(layer_loop=layer_loop)
    pc = cfg.parallel
    if pc.context > 1 and pc.context_config.block == AUTO:
        block = context_block(pc, cfg.data.seq_len, head_dim_of(model.llm), model.attention_impl,
                              backend=target.platform, generation=target.chip.name)
        pc = dataclasses.replace(pc, context_config=dataclasses.replace(pc.context_config, block=block))
    return dataclasses.replace(cfg, model=model, parallel=pc)


# ----------------------------------------------------------------------------------------------------------------
# The abstract batch.


def context_length(cfg: loop.RunConfig) -> int:
    """The permuted sequence length the context plan gives (parallel.context.padded_length: a multiple of cp x block,
    2 x cp x block for zigzag; block "auto" as this host resolves it, see ``for_target`` for a target's). 'lpt'
    depends on the batch: planned on the run's first synthetic batch."""
    pc, s = cfg.parallel, cfg.data.seq_len
    if pc.context == 1:
        return s
    cc = pc.context_config
    if cc.mode == "lpt":
        from mllm_jax.data import SyntheticBatches

        first = SyntheticBatches(cfg.model, cfg.data, microbatches=pc.microbatches).batch_at(0)
        return int(loop.prepare_host_batch(first, cfg, leading=1)["input_ids"].shape[-1])
    block = context_block(pc, s, head_dim_of(cfg.model.llm), cfg.model.attention_impl)
    return padded_length(s, pc.context, cc.mode, block)


def batch_shapes(cfg: loop.RunConfig) -> dict:
    """The train batch's shapes and dtypes ([M, B/M, ...], as mllm_jax.data / datasets give it, after the context
    permutation), as jax.ShapeDtypeStructs without shardings."""
    from mllm_jax.data.batching import encoder_input_shape

    pc, dc, mc = cfg.parallel, cfg.data, cfg.model
    m, rows = pc.microbatches, dc.batch_size // pc.microbatches
    s = context_length(cfg)
    tok = jax.ShapeDtypeStruct((m, rows, s), np.int32)
    batch = {k: tok for k in ("input_ids", "labels", "positions", "segment_ids", "span_ids")}
    batch["encoder_inputs"], batch["feature_index"] = {}, {}
    for name, enc in mc.encoders.items():
        slots = dc.max_images if name == "vision" else dc.max_audio
        n = rows * dc.samples_per_row * slots
        if mc.is_native_resolution(name):
            # One patch row per instance slot: an instance of up to patches_per_row patches each (the loader packs
            # smaller ones several to a row, into a row bucket no larger than this).
            batch["encoder_inputs"][name] = native_input_shapes(enc, (m, n))
        else:
            batch["encoder_inputs"][name] = jax.ShapeDtypeStruct((m, n) + encoder_input_shape(enc), np.float32)
        batch["feature_index"][name] = tok
    if mc.llm.mrope_section:
        batch["rope_positions"] = jax.ShapeDtypeStruct((m, rows, s, 3), np.int32)
    return batch


def native_input_shapes(enc, leading: tuple) -> dict:
    """The packed patch rows of a native-resolution modality (docs/native_resolution.md) for ``leading`` = (.., R)."""
    p = enc.patches_per_row
    return {"patches": jax.ShapeDtypeStruct(leading + (p, enc.patch_dim), np.float32),
            "grid": jax.ShapeDtypeStruct(leading + (p, 3), np.int32),
            "segment_ids": jax.ShapeDtypeStruct(leading + (p,), np.int32)}


def abstract_batch(cfg: loop.RunConfig, mesh, rule_table) -> dict:
    shapes = batch_shapes(cfg)
    specs = placement.batch_specs(shapes, mesh, leading=1, rule_table=rule_table)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        shapes, specs, is_leaf=lambda s: isinstance(s, P))


# ----------------------------------------------------------------------------------------------------------------
# The abstract train step.


@dataclasses.dataclass
class AbstractStep:
    jitted: object  # jax.jit(train step, out_shardings, donate_argnums=0)
    state: object  # nnx.split((model, optimizer))[1], ShapeDtypeStruct leaves
    batch: dict
    model: object  # the abstract MultimodalModel
    optimizer: object
    mesh: object


def build_step(cfg: loop.RunConfig, devices) -> AbstractStep:
    """The train step of loop.run (model, AdamW state, microbatch scan or pipeline, donation) on a mesh of
    ``devices``, from abstract arrays. Fresh parameters (a pretrained recipe has the same shapes)."""
    from mllm_jax.build import abstract_model
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import rule_table as make_rule_table
    from mllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from mllm_jax.train.step import make_train_step

    loop.validate(cfg, len(devices))
    mesh = make_mesh(cfg.parallel, devices)
    rule_table = make_rule_table(cfg.model, cfg.parallel)
    trainable = loop.trainable_filter(cfg.model)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)

    model = abstract_model(cfg.model, mesh, cfg.parallel, cfg.train.seed)
    # loop.make_nnx_optimizer records each parameter's concrete sharding for its moments; under eval_shape the
    # values are tracers, so record it here from the abstract arrays first.
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and hasattr(var.get_value(), "sharding"):
            var.set_metadata("optimizer_sharding", var.get_value().sharding.spec)
    with jax.set_mesh(mesh):
        optimizer = nnx.eval_shape(lambda m: loop.make_nnx_optimizer(m, tx, trainable), model)
        graphdef, state = nnx.split((model, optimizer))
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step = make_train_step(graphdef, trainable, schedule=learning_rate_schedule(cfg.optimizer, cfg.train.steps),
                               grads_fn=loop.make_grads_fn(cfg, mesh))
        jitted = jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)
        batch = abstract_batch(cfg, mesh, rule_table)
    return AbstractStep(jitted, state, batch, model, optimizer, mesh)


def compile_on_target(jitted, args: tuple, mesh, *, what: str):
    """(compiled, seconds, lowered): ``jitted.lower(*args).compile()`` with the target's compiler (the mesh's devices decide
    which). A rejection is a TargetCompileError naming ``what`` (target, layout) and the compiler's message; running
    out of HBM a DoesNotFitError. Every compile of this module goes through here, so a kernel the target's compiler
    refuses (Mosaic, Triton) fails here."""
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = jitted.lower(*args)
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's own error, reported with the target and layout
        if _is_out_of_memory(e):
            raise DoesNotFitError(f"{what}: does not fit in HBM (the compiler: {_first_lines(e, 3)})") from e
        raise TargetCompileError(f"{what}: the compiler rejected the program: {type(e).__name__}: "
                                 f"{_first_lines(e)}") from e
    return compiled, time.perf_counter() - t0, lowered


def compile_step(step: AbstractStep, *, what: str):
    return compile_on_target(step.jitted, (step.state, step.batch), step.mesh, what=what)


# ----------------------------------------------------------------------------------------------------------------
# Analysis of a compiled program.


def per_device_bytes(tree) -> float:
    total = 0.0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        if sharding is not None and hasattr(sharding, "shard_shape"):
            shape = sharding.shard_shape(shape)
        total += float(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                 r"(-start)?\(")


def _shape_bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} of the collectives in compiled HLO text: static op counts (an op inside a loop body
    once), bytes of each op's result per device (async *-start ops counted, their *-done not)."""
    out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVE_KINDS}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        kind, result = m.group(2), m.group(1)
        if m.group(3):  # async start: the result tuple holds (operands, outputs, ...): count the output half
            result_bytes = _shape_bytes(result) / 2
        else:
            result_bytes = _shape_bytes(result)
        out[kind]["count"] += 1
        out[kind]["bytes"] += result_bytes
    return out


def pallas_calls(hlo_text: str) -> int:
    """Pallas kernel calls in compiled HLO: custom calls to Mosaic (TPU) or Triton (GPU) that a ``pallas_call`` made
    (``pallas_kernels``), not the compiler's own (XLA:TPU lowers a dense softmax-matmul to an "online-softmax" Mosaic
    call of its own)."""
    return sum(pallas_kernels(hlo_text).values())


_KERNEL_NAME = re.compile(r'op_name="[^"]*?([A-Za-z0-9_]+)\)*/pallas_call')


def pallas_kernels(hlo_text: str) -> dict:
    """{kernel name: calls} of the Pallas calls in compiled HLO (the name the kernel was given, from op_name); custom
    calls whose op_name shows no pallas_call are the compiler's, not counted."""
    out: dict = {}
    for line in hlo_text.splitlines():
        if any(f'custom_call_target="{t}"' in line for t in PALLAS_TARGETS):
            m = _KERNEL_NAME.search(line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def _cost(compiled, lowered=None) -> dict:
    """The compiled program's cost analysis; where the back end gives none (the deviceless GPU back end returns
    None), that of the lowered program before the target's optimisations (marked "_from_lowered")."""
    def one(c):
        c = c() if callable(c) else c
        if isinstance(c, (list, tuple)):  # older jax: one dict per program
            c = c[0] if c else {}
        return dict(c or {})

    cost = one(compiled.cost_analysis)
    if not cost.get("flops") and lowered is not None:
        cost = one(lowered.cost_analysis)
        if cost.get("flops"):
            cost["_from_lowered"] = 1.0
    return cost


# ----------------------------------------------------------------------------------------------------------------
# Model FLOPs.


def model_flops(cfg: loop.RunConfig) -> dict:
    """Model FLOPs of one train step (mllm_jax.costs.step_model_flops: the planner's layer costs, frozen-aware, no
    remat recompute), for the batch the step takes: every row's encoder instances at the data's capacity."""
    dc = cfg.data
    per_row = {"vision": dc.max_images, "audio": dc.max_audio}
    instances = {n: dc.samples_per_row * per_row.get(n, 1) for n in cfg.model.encoders}
    return step_model_flops(cfg.model, rows=dc.batch_size, seq_len=dc.seq_len, instances_per_row=instances)


# ----------------------------------------------------------------------------------------------------------------
# The whole check.


def _first_lines(e: Exception, n: int = 6) -> str:
    text = str(e).strip()
    lines = [l for l in text.splitlines() if l.strip()]
    return " | ".join(lines[:n])[:1500] or type(e).__name__


def _is_out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text and ("hbm" in text.lower() or "memory" in text.lower()) and \
        "smem" not in text.lower() and "vmem" not in text.lower()


def compile_for_target(cfg: loop.RunConfig, target: Target, *, costs: bool = True, log=None) -> dict:
    """Compile the run's train step for ``target`` and return the report (see the module docstring).

    Raises TargetCompileError when the target's compiler rejects the program, DoesNotFitError (with the report)
    when it does not fit in HBM."""
    log = log or (lambda *_: None)
    cfg = loop.for_devices(cfg, target.num_devices, chip=target.chip)
    run_cfg = for_target(cfg, target)
    layout = layout_name(cfg.parallel)
    devices = target.devices()
    step = build_step(run_cfg, devices)
    what = (f"target {target.topology} ({target.chip.hbm_gib:.1f} GiB HBM per chip), layout {layout}, "
            f"attention_impl {run_cfg.model.attention_impl}, the train step")
    compiled, compile_s, lowered = compile_step(step, what=what)
    log(f"compiled for {target.topology} ({len(devices)} devices, layout {layout}) in {compile_s:.1f} s")
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    params_b = per_device_bytes(nnx.state(step.model))
    opt_b = per_device_bytes(nnx.state(step.optimizer))
    batch_b = per_device_bytes(step.batch)
    arg_b, out_b = float(mem.argument_size_in_bytes), float(mem.output_size_in_bytes)
    alias_b, temp_b = float(mem.alias_size_in_bytes), float(mem.temp_size_in_bytes)
    code_b = float(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
    total_b = arg_b + out_b - alias_b + temp_b + code_b
    hbm_gib = target.chip.hbm_gib

    has_loops = run_cfg.model.layer_loop != "unrolled" or cfg.parallel.microbatches > 1
    cost_basis = "this program (no loops)"
    cost_s = 0.0
    if not costs:
        cost, cost_basis = {}, "not computed"
    elif has_loops and cfg.parallel.pipeline == 1:
        m = cfg.parallel.microbatches
        one = dataclasses.replace(run_cfg, model=run_cfg.model.replace(layer_loop="unrolled"),
                                  data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // m),
                                  parallel=dataclasses.replace(cfg.parallel, microbatches=1))
        # Announced first: the copy can take far more host memory than the step (a process killed here is the
        # host running out of memory; train.py --nocompile_costs skips the copy).
        log("compiling an unrolled copy of one microbatch for the FLOP and byte figures (it can need more host "
            "memory than the step; costs=False, train.py --nocompile_costs, skips it)")
        cost_compiled, cost_s, cost_lowered = compile_step(build_step(one, devices),
                                                           what=what + "'s unrolled copy for the cost figures")
        cost = {k: v * m for k, v in _cost(cost_compiled, cost_lowered).items() if isinstance(v, (int, float))}
        cost_basis = (f"an unrolled copy (ModelConfig.layer_loop='unrolled') of one microbatch, x {m} microbatches"
                      if m > 1 else "an unrolled copy (ModelConfig.layer_loop='unrolled')")
        log(f"compiled the unrolled copy for the cost figures in {cost_s:.1f} s")
    else:
        cost = _cost(compiled, lowered)
        if has_loops:
            cost_basis = "this program; the pipeline schedule's loop bodies are counted once (a lower bound)"
    if cost.get("_from_lowered"):
        cost_basis += "; figures of the lowered program (this back end's compiled program has no cost analysis)"
    chip = target.chip
    n_dev = len(devices)
    if costs and not cost.get("flops"):
        # The deviceless GPU back end (jax-cuda12-plugin 0.10.2) returns no cost analysis, compiled or lowered.
        cost_basis = f"none: the {target.platform.upper()} back end gives no cost analysis without a device"
        costs = False
    flops = float(cost.get("flops", 0.0)) if costs else None
    bytes_accessed = float(cost.get("bytes accessed", 0.0)) if costs else None
    roofline = max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth) if costs else None
    mf = model_flops(run_cfg)
    mfu = mf["total"] / (n_dev * chip.peak_flops * roofline) if roofline else None
    report = {
        "target": target.topology,
        "target_text": target.text,
        "chip": chip.name,
        "devices": n_dev,
        "layout": layout,
        "mesh": {k: int(v) for k, v in step.mesh.shape.items()},
        "attention_impl": run_cfg.model.attention_impl,
        "layer_loop": run_cfg.model.layer_loop,
        "fits": total_b <= chip.hbm_bytes,
        "per_device_gib": total_b / GiB,
        "hbm_gib": hbm_gib,
        "memory_gib": {"parameters": params_b / GiB, "optimizer_state": opt_b / GiB, "batch": batch_b / GiB,
                       "arguments": arg_b / GiB, "outputs": out_b / GiB, "aliased": alias_b / GiB,
                       "temporaries": temp_b / GiB, "generated_code": code_b / GiB, "total": total_b / GiB},
        "flops_per_device": flops,
        "bytes_per_device": bytes_accessed,
        "cost_basis": cost_basis,
        "model_flops": mf["total"],
        "model_flops_parts": mf["parts"],
        "peak_flops_per_device": chip.peak_flops,
        "hbm_bandwidth": chip.hbm_bandwidth,
        "roofline_step_s": roofline,
        "roofline_bound": ("compute" if flops / chip.peak_flops >= bytes_accessed / chip.hbm_bandwidth
                           else "memory") if costs else None,
        "mfu_bound": mfu,
        "pallas_calls": pallas_calls(hlo),
        "pallas_kernels": pallas_kernels(hlo),
        "collectives": collectives(hlo),
        "compile_s": compile_s,
        "cost_compile_s": cost_s,
    }
    if not report["fits"]:
        raise DoesNotFitError(f"target {target.topology}, layout {layout}: needs {report['per_device_gib']:.2f} GiB "
                              f"per chip (arguments {arg_b / GiB:.2f} + outputs {out_b / GiB:.2f} - aliased "
                              f"{alias_b / GiB:.2f} + temporaries {temp_b / GiB:.2f}), more than the "
                              f"{hbm_gib:.1f} GiB of HBM of a {chip.name}", report)
    return report


def format_report(r: dict) -> list[str]:
    g = r["memory_gib"]
    lines = [
        f"target {r['target']}: {r['devices']} x {r['chip']}, mesh {r['mesh']} ({r['layout']}), attention "
        f"{r['attention_impl']}, layers {r['layer_loop']}",
        f"memory per device (GiB): parameters {g['parameters']:.3f}, optimizer state {g['optimizer_state']:.3f}, "
        f"batch {g['batch']:.3f}, temporaries {g['temporaries']:.3f}; total {g['total']:.3f} of {r['hbm_gib']:.1f} "
        f"HBM -> {'fits' if r['fits'] else 'DOES NOT FIT'}",
        (f"cost per device: {r['flops_per_device']:.4g} FLOPs, {r['bytes_per_device']:.4g} bytes accessed "
         f"(from {r['cost_basis']})" if r["flops_per_device"] is not None else
         f"cost per device: unknown ({r['cost_basis']})"),
        f"model FLOPs of the step (all devices): {r['model_flops']:.4g} ("
        + ", ".join(f"{k} {v:.3g}" for k, v in r["model_flops_parts"].items()) + ")",
        (f"roofline step time {r['roofline_step_s'] * 1e3:.3f} ms ({r['roofline_bound']}-bound at "
         f"{r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s, {r['hbm_bandwidth'] / 1e9:.0f} GB/s); mfu_bound "
         f"{r['mfu_bound']:.3f}" if r["roofline_step_s"] is not None else "roofline step time: unknown"),
        f"Pallas kernel calls: {r['pallas_calls']} (static count in the compiled program"
        + (": " + ", ".join(f"{k} {v}" for k, v in sorted(r["pallas_kernels"].items())) if r["pallas_kernels"] else "")
        + ")",
        "collectives (static count, bytes per device): " + (", ".join(
            f"{k} {v['count']} ({v['bytes'] / 2**20:.2f} MiB)" for k, v in r["collectives"].items() if v["count"])
            or "none"),
        f"compile time {r['compile_s']:.1f} s" + (f" (+ {r['cost_compile_s']:.1f} s for the cost copy)"
                                                  if r["cost_compile_s"] else ""),
    ]
    return lines


def summary_json(r: dict) -> dict:
    """The last line's object: the keys the issue asks for and the layout."""
    keys = ("target", "devices", "layout", "attention_impl", "fits", "per_device_gib", "hbm_gib", "flops_per_device",
            "bytes_per_device", "model_flops", "roofline_step_s", "mfu_bound", "pallas_calls", "pallas_kernels", "collectives",
            "compile_s", "cost_basis")
    return {k: r[k] for k in keys}


def main(cfg: loop.RunConfig, target: Target, *, print_fn=print, costs: bool = True) -> int:
    """--compile_only: the report, then one JSON line (also on failure: fits false and the error). 0 when it
    compiled and fits, 1 otherwise (the error on stderr names the target, the layout and the figure)."""
    import json
    import sys

    failure = None
    try:
        report = compile_for_target(cfg, target, costs=costs, log=print_fn)
    except DoesNotFitError as e:
        failure, report = e, e.report
    except (TargetCompileError, RuntimeError, ValueError) as e:
        failure, report = e, None
        try:  # the error line names the layout as filled for the target, where it can be
            cfg = loop.for_devices(cfg, target.num_devices, chip=target.chip)
        except ValueError:
            pass
    if report is not None:
        for line in format_report(report):
            print_fn(line)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        out = summary_json(report) if report is not None else {
            "target": target.topology, "devices": target.num_devices, "layout": layout_name(cfg.parallel),
            "fits": False, "hbm_gib": target.chip.hbm_gib}
        out["error"] = str(failure)
        print_fn(json.dumps(out))
        return 1
    print_fn(json.dumps(summary_json(report)))
    return 0
