"""1F1B pipeline runtime: the schedule table, one-device equality of loss and gradients, bounded memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mllm_jax.parallel.pipeline import (
    FIELDS,
    OP_B,
    OP_BWD,
    OP_FB,
    OP_BWD_SKIP,
    OP_FWD,
    OP_IDLE,
    OP_W,
    TO_LEFT,
    TO_RIGHT,
    TO_SELF,
    build_schedule,
    layout_schedule,
    make_layout,
    pipeline_value_and_grad,
    sequential_value_and_grad,
)

# ----------------------------------------------------------------------------------------------------------------
# The schedule as data.


def replay(sched, stages=None, M=None):
    """Run the table on symbolic buffers: every read must find exactly the (virtual stage, microbatch) the op names,
    every message must arrive where the table stores it (and nothing else arrive), and everything must be consumed
    (saved inputs and kept cotangents share one pool of activation slots per device). Returns each device's peak
    live slots."""
    col = {f: sched.column(f) for f in FIELDS}
    S = sched.stages
    K = S * sched.virtual_stages
    ops, mbs, ks = col["op"], col["mb"], col["virtual"]
    # Virtual stages with a backward (their saved inputs stay until it).
    has_bw = {int(k) for k in ks[(ops == OP_BWD) | (ops == OP_B) | (ops == OP_FB)]}
    acts = [dict() for _ in range(S)]  # slot -> ("x" | "w", virtual stage, microbatch)
    gs = [dict() for _ in range(S)]  # slot -> (virtual stage, microbatch)
    x_channel = {TO_RIGHT: (1, "recv_x_slot"), TO_LEFT: (-1, "recv_xl_slot"), TO_SELF: (0, "recv_xo_slot")}
    g_channel = {TO_LEFT: (-1, "recv_g_slot"), TO_RIGHT: (1, "recv_gr_slot"), TO_SELF: (0, "recv_go_slot")}
    lag = 2 if sched.overlap else 1  # a message to another device is stored lag - 1 ticks after its own
    later_x, later_g = {}, {}  # tick -> {(device, recv column): what arrives}
    peak = [0] * S
    # "1f1b_sliced": each (virtual stage, microbatch)'s forward slices must cover its layers in order from 0, its
    # backward slices from the top down to 0; -1 columns are whole ops.
    n_of = sched.slicing.stage_layers if sched.slicing is not None else None
    f_at, b_at = {}, {}  # (k, m) -> the next layer its forward starts at / its backward ends at

    def slice_of(at, k, m, lo, hi, up):
        """(first, last) slice of an op, after checking it continues where the last one ended."""
        if lo < 0:
            assert hi < 0 and n_of is None
            return True, True
        n = n_of[k]
        want = at.get((k, m), 0 if up else n)
        assert (lo if up else hi) == want and 0 <= lo < hi <= n, f"slice [{lo}, {hi}) of {(k, m)} after {want}"
        at[(k, m)] = hi if up else lo
        return want == (0 if up else n), (hi == n if up else lo == 0)
    for t in range(sched.table.shape[0]):
        sent_x, sent_g = later_x.pop(t, {}), later_g.pop(t, {})  # (device, recv column) -> what arrives

        def send(d, to, channels, sent, what):
            step, name = channels[int(to)]
            key = ((d + step) % S, name)
            box = sent if to == TO_SELF else (later_x if channels is x_channel else later_g).setdefault(
                t + lag - 1, {}) if lag > 1 else sent
            assert key not in box, "two messages on one channel"
            box[key] = what

        for d in range(S):
            op, m, k = ops[t, d], mbs[t, d], ks[t, d]
            xs, ws = col["x_slot"][t, d], col["w_slot"][t, d]
            if op in (OP_FWD, OP_FB):
                first, last = slice_of(f_at, k, m, col["f_lo"][t, d], col["f_hi"][t, d], True)
                if k > 0 or not first:
                    assert acts[d][xs] == ("x", k, m)
                    if k not in has_bw and last:  # no backward: the forward read it last
                        del acts[d][xs]
                else:
                    assert xs >= 0 and xs not in acts[d], "overwrote a live slot"
                    acts[d][xs] = ("x", k, m)  # without a backward: a scratch slot until the forward's last slice
                    peak[d] = max(peak[d], len(acts[d]) - (k not in has_bw))  # before a paired backward frees its
                    if k not in has_bw and last:
                        del acts[d][xs]
                if not last:  # the next slice goes on from the row this one wrote: nothing sent
                    assert col["x_to"][t, d] < 0
                elif k + 1 < K:
                    send(d, col["x_to"][t, d], x_channel, sent_x, ("x", k + 1, m))
                elif col["recv_gl_slot"][t, d] >= 0:  # the loss cotangent, kept for this stage's backward
                    sent_g[(d, "recv_gl_slot")] = (k, m)
            back = op in (OP_BWD, OP_B, OP_FB)
            mb = col["mb2"][t, d] if op == OP_FB else m
            done = back and slice_of(b_at, k, mb, col["b_lo"][t, d], col["b_hi"][t, d], False)[1]
            if op == OP_FB:  # the backward half, after the forward half
                assert acts[d][col["x2_slot"][t, d]] == ("x", k, mb)
                if done:
                    del acts[d][col["x2_slot"][t, d]]
            elif back:
                assert acts[d][xs] == ("x", k, mb)
                if op == OP_BWD and done:
                    del acts[d][xs]
                elif op == OP_B:
                    assert ws not in acts[d], "overwrote a live slot"
                    acts[d][ws] = ("w", k, mb)
            if back:
                g = col["g_slot"][t, d]
                if g >= 0:
                    assert gs[d].pop(g) == (k, mb)
                else:  # only a paired op's backward of the microbatch its forward half just made
                    assert op == OP_FB and k == K - 1 and mb == m
                if not done:  # a slice above the bottom: its cotangent to the stage's own next slice
                    assert col["g_to"][t, d] == TO_SELF
                    sent_g[(d, "recv_go_slot")] = (k, mb)
                elif k > 0 and col["g_to"][t, d] >= 0:
                    send(d, col["g_to"][t, d], g_channel, sent_g, (k - 1, mb))
            elif op == OP_W:
                assert acts[d].pop(xs) == ("x", k, m) and acts[d].pop(ws) == ("w", k, m)
        for d in range(S):
            for name in ("recv_x_slot", "recv_xl_slot", "recv_xo_slot"):
                slot = col[name][t, d]
                assert (slot >= 0) == ((d, name) in sent_x), f"tick {t} device {d}: {name}"
                if slot >= 0:
                    assert slot not in acts[d], "overwrote a live activation"
                    acts[d][slot] = sent_x[(d, name)]
            for name in ("recv_g_slot", "recv_gr_slot", "recv_go_slot", "recv_gl_slot"):
                slot = col[name][t, d]
                assert (slot >= 0) == ((d, name) in sent_g), f"tick {t} device {d}: {name}"
                if slot >= 0:
                    assert slot not in gs[d], "overwrote a live cotangent"
                    assert slot < sched.g_slots
                    gs[d][slot] = sent_g[(d, name)]
            peak[d] = max(peak[d], len(acts[d]))
            assert all(slot < sched.act_slots for slot in acts[d])
    assert all(not a for a in acts) and all(not g for g in gs)  # everything was consumed
    assert not later_x and not later_g  # and nothing was still on its way
    if n_of is not None:  # every op ran all its layers
        assert all(v == n_of[k] for (k, _), v in f_at.items())
        assert set(b_at.values()) <= {0}
    return peak


@pytest.mark.parametrize("stages,M", [(1, 3), (2, 1), (2, 5), (4, 2), (4, 8), (5, 16)])
def test_1f1b_table(stages, M):
    sched = build_schedule(stages, M)
    ops, mbs = sched.ops, sched.column("mb")
    for s in range(stages):
        seq = [(op, m) for op, m in zip(ops[:, s], mbs[:, s]) if op != OP_IDLE]
        fwd = [m for op, m in seq if op == OP_FWD]
        bwd = [m for op, m in seq if op == OP_BWD]
        assert fwd == list(range(M)) and bwd == list(range(M))
        # Warm-up: stages - s - 1 forwards, then one more forward before the first backward (capped at M).
        first_b = next(i for i, (op, _) in enumerate(seq) if op == OP_BWD)
        assert first_b == min(stages - s - 1, M - 1) + 1 if M > stages - s - 1 else first_b == M
        # Steady state alternates F and B until the forwards run out.
        steady = seq[first_b - 1 : first_b - 1 + 2 * (M - min(stages - s - 1, M))]
        assert all(op == (OP_FWD if i % 2 == 0 else OP_BWD) for i, (op, _) in enumerate(steady))
        # In flight (forwarded, not yet backwarded) never exceeds stages - s.
        live = np.cumsum([1 if op == OP_FWD else -1 for op, _ in seq])
        assert live.max() == min(stages - s, M)
    # Dependencies: forward after the previous stage's forward, backward after the next stage's backward.
    when = {(op, s, m): t for t in range(ops.shape[0]) for s in range(stages) for op, m in [(ops[t, s], mbs[t, s])]}
    for m in range(M):
        for s in range(1, stages):
            assert when[(OP_FWD, s, m)] > when[(OP_FWD, s - 1, m)]
            assert when[(OP_BWD, s - 1, m)] > when[(OP_BWD, s, m)]
        assert when[(OP_BWD, stages - 1, m)] > when[(OP_FWD, stages - 1, m)]
    assert sched.act_slots <= stages  # bounded by the stages in flight, not by M
    assert tuple(replay(sched, stages, M)) == sched.peak_act


def test_gpipe_table_holds_every_microbatch():
    assert build_schedule(3, 7, kind="gpipe").act_slots == 7
    with pytest.raises(ValueError, match="schedule kind"):
        build_schedule(3, 7, kind="zigzag")


def test_frozen_prefix_skips_backward():
    layout = make_layout((2, 1, 2), trainable_layers=[0, 0, 0, 1, 1])
    assert layout.backward_stages.tolist() == [False, False, True]
    assert layout.kind[2].tolist() == [2, 3]  # first trainable layer: dW only; the next one dX + dW
    sched = build_schedule(3, 4, backward_stages=layout.backward_stages)
    assert (sched.ops[:, :2] != OP_BWD).all() and (sched.ops[:, :2] == OP_BWD_SKIP).sum() == 8
    assert (sched.column("recv_g_slot")[:, :2] < 0).all()  # nothing is sent back into the frozen prefix
    padded = make_layout((1, 3), trainable_layers=[1, 0, 0, 0])
    assert padded.active.tolist() == [[True, False, False], [True, True, True]]
    assert padded.kind.tolist() == [[2, 0, 0], [1, 1, 1]]  # frozen after trainable: dX only
    with pytest.raises(ValueError, match="trainable_layers"):
        make_layout((1, 3), trainable_layers=[1, 0])


# ----------------------------------------------------------------------------------------------------------------
# Numerics against one device.

D = 8


def layer_fn(p, x, aux_m):
    return jnp.tanh(x @ p["w"] + p["b"]) + x * aux_m["scale"]


def loss_fn(lp, y, aux_m):
    return jnp.sum((y @ lp["v"] - aux_m["target"]) ** 2)


def problem(n_layers, M, mb=2, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"w": jax.random.normal(k[0], (n_layers, D, D)) * 0.4, "b": jax.random.normal(k[1], (n_layers, D)) * 0.1}
    lp = {"v": jax.random.normal(k[2], (D, 3))}
    x = jax.random.normal(k[3], (M, mb, D))
    aux = {"scale": jnp.linspace(0.5, 1.0, M), "target": jnp.ones((M, mb, 3))}
    return params, lp, x, aux


def pipeline_mesh(shape, names):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape), devices=jax.devices()[:n])


def check_equal(mesh, stage_layers, M, trainable, input_grad, x_spec=None, w_spec=None, mb=2, schedule="1f1b",
                param_trainable=None, virtual_stages=None, overlap=False, slicing=None):
    n = sum(stage_layers)
    params, lp, x, aux = problem(n, M, mb=mb)
    tr = np.ones(n, bool) if trainable is None else np.asarray(trainable, bool)
    loss_ref, (g_ref, glp_ref, gx_ref) = jax.jit(
        lambda p, lp, x, aux: sequential_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux)
    )(params, lp, x, aux)

    def run(p, lp, x, aux):
        return pipeline_value_and_grad(
            layer_fn,
            p,
            x,
            loss_fn=loss_fn,
            loss_params=lp,
            aux=aux,
            stage_layers=stage_layers,
            mesh=mesh,
            trainable_layers=tr,
            input_requires_grad=input_grad,
            schedule=schedule,
            param_trainable=param_trainable,
            virtual_stages=virtual_stages,
            overlap=overlap,
            slicing=slicing,
        )

    with jax.set_mesh(mesh):
        if x_spec is not None:
            x = jax.device_put(x, NamedSharding(mesh, x_spec))
        if w_spec is not None:
            params = {"w": jax.device_put(params["w"], NamedSharding(mesh, w_spec)), "b": params["b"]}
        loss, (g, glp, gx) = jax.jit(run)(params, lp, x, aux)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for name in ("w", "b"):
        leaf_trains = param_trainable is None or param_trainable[name]
        want = np.asarray(g_ref[name]) * (tr.reshape((-1,) + (1,) * (g_ref[name].ndim - 1)) & leaf_trains)
        np.testing.assert_allclose(g[name], want, rtol=2e-5, atol=2e-5)
        assert np.abs(want).max() > 0 or not (tr.any() and leaf_trains)
    np.testing.assert_allclose(glp["v"], glp_ref["v"], rtol=2e-5, atol=2e-5)
    if input_grad:
        assert np.abs(gx_ref).max() > 0
        np.testing.assert_allclose(gx, gx_ref, rtol=2e-5, atol=2e-5)
    else:
        assert gx is None


CASES = [
    # (stages, stage_layers, M, trainable per layer, input needs grad)
    (2, (1, 1), 1, None, False),
    (2, (3, 1), 3, None, True),
    (2, (2, 3), 8, [0, 0, 1, 0, 1], False),  # frozen prefix (stage 0 skips its backward), frozen after trainable
    (4, (1, 3, 2, 1), 5, [0, 0, 1, 0, 1, 1, 0], False),
    (4, (2, 2, 2, 2), 8, [0] * 8, True),  # all frozen, the input trains (projectors): dX everywhere
    (4, (2, 1, 1, 1), 2, None, False),  # fewer microbatches than stages
]


@pytest.mark.slow
@pytest.mark.parametrize("stages,stage_layers,M,trainable,input_grad", CASES)
def test_pipeline_matches_one_device(stages, stage_layers, M, trainable, input_grad):
    check_equal(pipeline_mesh((stages,), ("pipeline",)), stage_layers, M, trainable, input_grad)


@pytest.mark.slow
def test_pipeline_composes_with_data_and_tensor():
    mesh = pipeline_mesh((2, 2, 2), ("data", "pipeline", "tensor"))
    # The microbatch's batch dimension over `data`, the layer weights' output dim over `tensor`.
    check_equal(mesh, (2, 1), 4, [1, 0, 1], True, x_spec=P(None, "data", None), w_spec=P(None, None, "tensor"), mb=4)


@pytest.mark.slow
def test_1f1b_memory_is_bounded_in_microbatches():
    mesh = pipeline_mesh((4,), ("pipeline",))
    n, mb, width = 8, 32, 64

    def temp_bytes(M, schedule):
        params = {"w": jnp.zeros((n, width, width)), "b": jnp.zeros((n, width))}
        lp = {"v": jnp.zeros((width, 3))}
        aux = {"scale": jnp.zeros((M,)), "target": jnp.zeros((M, mb, 3))}
        x = jnp.zeros((M, mb, width))

        def run(p, lp, x, aux):
            return pipeline_value_and_grad(
                layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux, stage_layers=(2, 2, 2, 2), mesh=mesh,
                schedule=schedule,
            )

        with jax.set_mesh(mesh):
            return jax.jit(run).lower(params, lp, x, aux).compile().memory_analysis().temp_size_in_bytes

    act = mb * width * 4
    one_f_one_b = [temp_bytes(M, "1f1b") for M in (4, 16)]
    gpipe = [temp_bytes(M, "gpipe") for M in (4, 16)]
    # 1F1B keeps at most `stages` stage inputs whatever M; GPipe keeps all M (12 more here). What grows with M is
    # the device's share of the microbatch inputs (the conveyor's max(2, M / 4) slots: 2 more from M = 4 to 16), not
    # all M of them (12 more).
    assert one_f_one_b[1] - one_f_one_b[0] < 3 * act
    assert gpipe[1] - gpipe[0] >= 12 * act
    # ZB-H1's deferred Ws keep their cotangents in 1F1B's activation pool: the same compiled memory (a slot is
    # (2 + 1) layer rows of `act` bytes here; the difference stays below one row).
    assert abs(temp_bytes(16, "zb_h1") - one_f_one_b[1]) < act


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1", "1f1b_fb"])
def test_no_conditional_carries_the_activation_pool(schedule):
    # The pool of saved layer inputs (and B's kept cotangents) is written in place: no conditional of the compiled
    # program takes or returns it (a lax.switch over the ops, or a cond around a store, made XLA copy it: 5 GiB more
    # temporaries per device for the LLaVA-7B step, docs/pipeline.md). Its shape is made unique here to find it.
    mesh = pipeline_mesh((2,), ("pipeline",))
    n, M, mb, width = 4, 4, 5, 24
    params = {"w": jnp.zeros((n, width, width)), "b": jnp.zeros((n, width))}
    lp, aux = {"v": jnp.zeros((width, 3))}, {"scale": jnp.zeros((M,)), "target": jnp.zeros((M, mb, 3))}
    x = jnp.zeros((M, mb, width))

    def run(p, lp, x, aux):
        return pipeline_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux, stage_layers=(2, 2),
                                       mesh=mesh, schedule=schedule, input_requires_grad=True)

    with jax.set_mesh(mesh):
        hlo = jax.jit(run).lower(params, lp, x, aux).compile().as_text()
    layout = make_layout((2, 2), np.ones(n, bool), input_requires_grad=True, schedule=schedule)
    pool = f"f32[{layout_schedule(layout, M, schedule).act_slots},2,{mb},{width}]"
    assert any(" while(" in line and pool in line for line in hlo.splitlines()), f"no loop carries {pool}"
    carrying = [line.strip()[:160] for line in hlo.splitlines() if " conditional(" in line and pool in line]
    assert not carrying, carrying


@pytest.mark.slow
def test_bfloat16_activations_and_their_input_gradient():
    # The big recipes' compute dtype: bfloat16 activations between stages and a bfloat16 input gradient carried back
    # from stage 0 (once a psum over the stages, which XLA:CPU failed to compile in bfloat16 on a mesh with more
    # axes: train.py with ModelConfig.dtype="bfloat16" and pipeline=2 aborted on CPU). Oracle: the float32
    # sequential run on the same (bfloat16-rounded) inputs; bfloat16 keeps 8 bits, so the gradients agree to ~1% in
    # norm, not per element.
    mesh = pipeline_mesh((2, 2), ("data", "pipeline"))
    params, lp, x, aux = problem(3, 2)
    x = x.astype(jnp.bfloat16)

    def layer_as_x(p, h, aux_m):  # the layer in its input's dtype (weights cast as the model's layers do)
        return layer_fn(jax.tree.map(lambda a: a.astype(h.dtype), p), h, aux_m).astype(h.dtype)

    def loss32(lp_, y, aux_m):
        return loss_fn(lp_, y.astype(jnp.float32), aux_m)

    want_loss, (want, _, want_gx) = jax.jit(lambda p, lp_, xx, a: sequential_value_and_grad(
        layer_as_x, p, xx, loss_fn=loss32, loss_params=lp_, aux=a))(params, lp, x.astype(jnp.float32), aux)
    with jax.set_mesh(mesh):
        x = jax.device_put(x, NamedSharding(mesh, P(None, "data")))  # the microbatch rows over `data`
        loss, (g, _, gx) = jax.jit(lambda p, lp_, xx, a: pipeline_value_and_grad(
            layer_as_x, p, xx, loss_fn=loss32, loss_params=lp_, aux=a, stage_layers=(2, 1), mesh=mesh,
            input_requires_grad=True))(params, lp, x, aux)
    assert gx.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss, want_loss, rtol=2e-2)
    for name, got, ref in (("dx", gx, want_gx), ("dw", g["w"], want["w"]), ("db", g["b"], want["b"])):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.linalg.norm(got - ref) <= 2e-2 * np.linalg.norm(ref), (name, np.linalg.norm(got - ref) /
                                                                           np.linalg.norm(ref))
