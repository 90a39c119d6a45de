"""The pipeline's virtual-stage runtime and its overlapped ppermutes compiled for a TPU target (XLA:TPU + Mosaic,
deviceless): the schedule the planner simulates is what the target's compiler schedules."""

from __future__ import annotations

import re

import pytest

from mllm_jax.parallel.pipeline import CONVEYOR_SCOPE
from mllm_jax.parallel.schedule import build_schedule, default_slicing
from mllm_jax.train import compile_target as ct
from mllm_jax.train import loop, pipelined_step, targets
from test_compile_target import ROOT, needs_cuda, needs_tpu

# Shrunk (as test_compile_target.py's vlm_tiny) to keep the two compiles short: 4 LLM layers (two chunks of two
# stages under zb_v), one vision layer.
LAYOUT = ["ParallelConfig.pipeline=2", "ParallelConfig.data=2", "ParallelConfig.microbatches=4",
          "LLMConfig.n_layers=4", "VisionConfig.n_layers=1"]


def tick_loop_order(hlo: str) -> list:
    """In the compiled loop body that holds the pipeline's ppermutes: the order of collective-permute starts ("S"),
    dones ("D") and the tick's ops ("op": each op is a loop over its chunk's layers, ``while`` in the tick's body,
    whose trip count is zero unless the table names that op). The conveyor's start and done (the inputs' and input
    gradients' ring, ``parallel.conveyor``) are "C" and "CD"."""
    for comp in re.split(r"\n(?=\S)", hlo):
        if comp.startswith("ENTRY") or "collective-permute-start(" not in comp:
            continue
        seq, conveyor = [], set()
        for line in comp.splitlines():
            if "collective-permute-start(" in line:
                if CONVEYOR_SCOPE in line:
                    conveyor.add(line.split("=")[0].strip())
                seq.append("C" if CONVEYOR_SCOPE in line else "S")
            elif "collective-permute-done(" in line:
                operand = re.search(r"collective-permute-done\(([^)]*)\)", line).group(1).strip()
                seq.append("CD" if operand in conveyor else "D")
            elif " while(" in line:
                seq.append("op")
        if "op" in seq:
            return seq
    raise AssertionError("no loop body with the pipeline's ppermutes and its ops' loops")


@needs_tpu
@pytest.mark.slow
def test_overlapped_ppermutes_run_beside_the_ops_on_tpu():
    """zb_v (two chunks per device, the V) with ``pipeline_overlap_comm`` on tpu:v5e:2x2 (pipeline x data): the TPU
    scheduler starts the tick's ppermutes before its op and finishes them after it. Without the option (1F1B) they
    start after the op: they wait for what it sends."""
    target = targets.parse("tpu:v5e:2x2")

    def compiled(*params):
        cfg = loop.load_run_config([f"{ROOT}/configs/vlm_tiny.gin"], LAYOUT + list(params))
        cfg = loop.for_devices(cfg, target.num_devices, chip=target.chip)
        step = ct.build_step(ct.for_target(cfg, target), target.devices())
        return ct.compile_step(step, what="pipeline overlap")[0].as_text()

    overlapped = tick_loop_order(compiled('ParallelConfig.pipeline_schedule="zb_v"',
                                          "ParallelConfig.pipeline_overlap_comm=True"))
    first_op, last_op = overlapped.index("op"), len(overlapped) - 1 - overlapped[::-1].index("op")
    assert "S" in overlapped[:first_op] and "D" in overlapped[last_op:], overlapped
    plain = tick_loop_order(compiled())
    assert "S" not in plain[: plain.index("op")], plain
    # The conveyor's move (one message per tick, on the ring; made at the end of the tick before) runs beside the
    # ops: with the overlap beside all of them, like the neighbours' messages; without it, XLA's scheduler starts it
    # before the last of the ops' loops only (enough to hide it by its estimate, which does not know the loops' trip
    # counts), and finishes it after.
    first_op, last_op = overlapped.index("op"), len(overlapped) - 1 - overlapped[::-1].index("op")
    assert overlapped.count("C") == 1 and overlapped.index("C") < first_op and last_op < overlapped.index("CD"), \
        overlapped
    last_op = len(plain) - 1 - plain[::-1].index("op")
    assert plain.count("C") == 1 and plain.index("C") < last_op < plain.index("CD"), plain


@needs_tpu
@pytest.mark.slow
def test_sliced_schedule_compiles_for_tpu_in_1f1b_memory(monkeypatch):
    """1f1b_sliced inside the real train step on tpu:v5e:2x2 (pipeline x data), the frozen LLM's slicing forced to
    one layer per tick (every op in slices): it compiles with the TPU's compiler, and its
    compiled temporaries are 1F1B's (the same order, so the same pool of activation slots; a slice's output is
    written into its slot's next row in place)."""
    target = targets.parse("tpu:v5e:2x2")
    frozen = ['ModelConfig.trainable = {"encoders/vision": False, "llm": False}']
    planned, ran = pipelined_step._stage_layers, []

    def two_units(*a, **kw):
        layers, kind, slicing = planned(*a, **kw)
        if kind == "1f1b_sliced":
            slicing = default_slicing(layers, budget=1)
            ran.append(build_schedule(len(layers), 4, kind=kind, slicing=slicing))
        return layers, kind, slicing

    monkeypatch.setattr(pipelined_step, "_stage_layers", two_units)

    def temp_bytes(*params):
        cfg = loop.load_run_config([f"{ROOT}/configs/vlm_tiny.gin"], LAYOUT + frozen + list(params))
        cfg = loop.for_devices(cfg, target.num_devices, chip=target.chip)
        step = ct.build_step(ct.for_target(cfg, target), target.devices())
        compiled = ct.compile_step(step, what="sliced schedule")[0]
        return compiled.memory_analysis().temp_size_in_bytes

    one = temp_bytes()
    sliced = temp_bytes('ParallelConfig.pipeline_schedule="1f1b_sliced"')
    assert abs(sliced - one) <= 0.02 * one, (sliced, one)
    assert (ran[0].column("f_lo") > 0).any() and (ran[0].column("b_lo") > 0).any()  # it ran slices


@pytest.mark.slow
@pytest.mark.parametrize("topology", [pytest.param("tpu:v5e:2x2", marks=needs_tpu),
                                      pytest.param("gpu:h100:1x4", marks=needs_cuda)])
def test_encoders_in_the_bubbles_compile_for_the_target_inside_the_tick_loop(topology, monkeypatch):
    """The frozen vision encoder's forwards in the pipeline's idle ticks (``pipeline_encoders="bubbles"``) inside the
    real train step on 4 chips (pipeline x data), the projector and the LLM training: the target's compiler takes
    it, and the encoder's matmuls are in the loop that holds the pipeline's ppermutes (more of them than with the
    encoders outside). What it costs in memory at a real size is in benchmarks/RESULTS.md (LLaVA-7B: +1.6% a
    tpu:v5p chip, +0.9% an H100); at this toy size the fixed buffers dominate any ratio."""
    target = targets.parse(topology)
    frozen = ['ModelConfig.trainable = {"encoders/vision": False}']
    planned, plans = pipelined_step._encode_plan, []
    monkeypatch.setattr(pipelined_step, "_encode_plan", lambda *a, **kw: plans.append(planned(*a, **kw)) or plans[-1])

    def compiled(where):
        cfg = loop.load_run_config([f"{ROOT}/configs/vlm_tiny.gin"],
                                   LAYOUT + frozen + [f'ParallelConfig.pipeline_encoders="{where}"'])
        cfg = loop.for_devices(cfg, target.num_devices, chip=target.chip)
        step = ct.build_step(ct.for_target(cfg, target), target.devices())
        return ct.compile_step(step, what=f"encoders {where}")[0]

    inside, outside = compiled("bubbles"), compiled("outside")
    assert plans[0] is not None and plans[0].microbatches and plans[1] is None
    dots = lambda c: tick_loop_dots(c.as_text())  # noqa: E731
    assert dots(inside) > dots(outside), (dots(inside), dots(outside))


def tick_loop_dots(hlo: str) -> int:
    """Matmuls (``dot`` / ``convolution`` ops, fused or not) in the computations reachable from the loop body that
    holds the pipeline's ppermutes: the tick's ops and whatever runs inside them."""
    comps = {}
    for comp in re.split(r"\n(?=\S)", hlo):
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", comp)
        if m:
            comps[m.group(1)] = comp
    body = next(n for n, c in comps.items() if "collective-permute-start(" in c and " while(" in c)
    seen, todo, count = set(), [body], 0
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        text = comps[name]
        count += len(re.findall(r"\s(?:dot|convolution)\(", text))
        todo += re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)", text)
        todo += [c for group in re.findall(r"branch_computations=\{([^}]*)\}", text)
                 for c in re.findall(r"%?([\w.\-]+)", group)]
    return count
