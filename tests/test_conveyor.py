"""The pipeline's inputs and input gradients stored over `pipeline` (``parallel.conveyor``): the plan replayed on
symbolic buffers for every schedule. (What a device holds in the compiled program: test_pipeline.py's 1F1B memory
test; the move beside the op on a TPU target: test_pipeline_compile.py.)"""

import dataclasses

import numpy as np
import pytest

from mllm_jax.parallel.conveyor import plan_conveyor
from mllm_jax.parallel.schedule import OP_B, OP_BW, OP_F, OP_FB, build_schedule, default_slicing


def home(S, K, M):
    """[devices, slots] -> the microbatch each slot holds before the step (its input) and after it (its input
    gradient); -1 past M."""
    return np.array([[d * K + j if d * K + j < M else -1 for j in range(K)] for d in range(S)])


def replay_conveyor(sched, M, input_grads=True, conv=None):
    """Run the plan on symbolic buffers as the runtime does: every device's slots, the tick's sends taken before its
    op, device 0's reads and writes in the op, the arrivals stored after it, then the tail. Returns the final
    input-gradient buffers [devices, slots] (microbatch ids, -1 empty)."""
    conv = conv or plan_conveyor(sched, M, input_grads=input_grads)
    S, K = sched.stages, conv.per_device
    xin = home(S, K, M)
    dxs = np.full((S, K), -1)
    ops, virtual, mb, mb2 = (sched.column(f) for f in ("op", "virtual", "mb", "mb2"))
    # Slices of "1f1b_sliced": the forward's first reads the input, the backward's last writes the input gradient.
    reads, writes = sched.column("f_lo") <= 0, sched.column("b_lo") <= 0
    down = lambda a: np.roll(a, -1, axis=0)  # noqa: E731  device d receives from d + 1
    for t in range(ops.shape[0]):
        sx, sg = conv.sends[t]
        arrived_x = down(xin[:, sx]) if sx >= 0 else None
        arrived_g = down(dxs[:, sg]) if sg >= 0 else None
        for d in np.flatnonzero(virtual[t] == 0):
            op = ops[t, d]
            if op in (OP_F, OP_FB) and reads[t, d]:
                m = mb[t, d]
                assert sx != m % K, f"tick {t}: the op reads slot {m % K}, which is moving"
                assert xin[d, m % K] == m, f"tick {t}: device {d} forwards {m} but its slot holds {xin[d, m % K]}"
            back = (mb[t, d] if op in (OP_B, OP_BW) else mb2[t, d] if op == OP_FB else -1) if writes[t, d] else -1
            if back >= 0 and input_grads:
                assert sg != back % K, f"tick {t}: the op writes slot {back % K}, which is moving"
                dxs[d, back % K] = back
        if arrived_x is not None:
            xin[:, sx] = arrived_x
        if arrived_g is not None:
            dxs[:, sg] = arrived_g
    for moving in conv.tail:
        dxs = np.where(moving[None, :], down(dxs), dxs)
    return conv, dxs


ONE_CHUNK = [(2, 1), (2, 2), (2, 5), (3, 4), (4, 4), (4, 5), (4, 16), (4, 17), (8, 24)]
CASES = [(kind, S, M, overlap) for kind in ("1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced") for S, M in ONE_CHUNK
         for overlap in (False, True)]
CASES += [("gpipe", S, M, False) for S, M in ONE_CHUNK]  # no overlapped table: a memory reference only
VIRTUAL = [(2, 2), (2, 6), (3, 6), (4, 8), (4, 16)]
CASES += [(kind, S, M, overlap) for kind in ("zb_v", "interleaved") for S, M in VIRTUAL for overlap in (False, True)]


@pytest.mark.parametrize("kind,stages,M,overlap", CASES)
def test_every_microbatch_reaches_device_0_and_its_gradient_returns_home(kind, stages, M, overlap):
    # Sliced: three layers per stage, a tick of 2 units (two forwards or one backward layer): every op in slices.
    slicing = default_slicing((3,) * stages) if kind == "1f1b_sliced" else None
    sched = build_schedule(stages, M, kind=kind, overlap=overlap, slicing=slicing)
    conv, dxs = replay_conveyor(sched, M)
    K = conv.per_device
    assert K == max(2, -(-M // stages))  # a device holds its share of the microbatches, not all M
    want = home(stages, K, M)
    np.testing.assert_array_equal(dxs, want)  # each gradient on the device, in the slot, its input came from
    for m in range(M):
        assert conv.owner(m) == divmod(m, K) and want[conv.owner(m)] == m
    # One message per tick at most (both buffers' moving slots in it), and only the gradients' tail after the loop.
    assert conv.sends.shape == (sched.table.shape[0], 2) and len(conv.tail) <= stages


def test_the_replay_catches_a_misplaced_move():
    # The oracle can fail: moving the input slot one tick late starves a forward, one tick early steals the slot
    # the tick's op reads.
    sched = build_schedule(4, 8)
    conv = plan_conveyor(sched, 8, input_grads=True)
    t = int(np.flatnonzero(conv.sends[:, 0] >= 0)[0])
    late = conv.sends.copy()
    late[t + 1:, 0], late[t, 0] = conv.sends[t:-1, 0], -1
    early = conv.sends.copy()
    early[t - 1:-1, 0], early[-1, 0] = conv.sends[t:, 0], -1
    replay_conveyor(sched, 8, conv=conv)
    for sends in (late, early):
        with pytest.raises(AssertionError):
            replay_conveyor(sched, 8, conv=dataclasses.replace(conv, sends=sends))


def test_no_input_gradient_no_moves_back():
    sched = build_schedule(4, 8)
    conv = plan_conveyor(sched, 8, input_grads=False)
    assert (conv.sends[:, 1] == -1).all() and conv.tail.size == 0


def test_refuses_tables_it_cannot_feed():
    sched = build_schedule(2, 4)
    with pytest.raises(ValueError, match="virtual stage 0 runs on device 1"):  # the ring delivers to device 0
        plan_conveyor(dataclasses.replace(sched, table=sched.table[:, ::-1]), 4, input_grads=True)
    with pytest.raises(ValueError, match=r"forwards microbatches \[0, 1, 2, 3\] on virtual stage 0; expected 0..4"):
        plan_conveyor(sched, 5, input_grads=False)
