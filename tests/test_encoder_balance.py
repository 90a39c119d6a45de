"""Encoder instances balanced over every device (mllm_jax.data.encoder_balance over
mllm_jax.parallel.instance_balance): the balanced batch gives the row-bound batch's loss and gradients on 8 fake
devices in every layout family (data, fsdp, context, tensor, pipeline), and the assignment meets Graham's closed-form
bounds for LPT (brute-force optimum on small cases)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.build import create_model
from mllm_jax.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.data import SyntheticBatches, TextCodec
from mllm_jax.data import encoder_balance as eb
from mllm_jax.data.context_batches import permute_for_context
from mllm_jax.data.placement import put_batch
from mllm_jax.freeze import trainable_filter
from mllm_jax.parallel.config import ContextConfig, ParallelConfig
from mllm_jax.parallel.instance_balance import assign, lower_bound
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import rule_table
from mllm_jax.train.config import DataConfig

CODEC = TextCodec()


def _config(**kw) -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(vocab_size=-(-CODEC.vocab_size // 8) * 8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
        encoders={"vision": VisionConfig(kind="vit", image_size=8, patch_size=4, d_model=16, n_layers=1, n_heads=2,
                                         d_ff=32, class_token=False, pre_norm=False)},
        projectors={"vision": ProjectorConfig(kind="mlp")},
        placeholder_ids={"vision": CODEC.placeholder_ids()["vision"]}, **kw)


# Half the samples are text: rows hold 0-2 images in 2 slots each, so row-bound devices get uneven real work.
DATA = DataConfig(batch_size=8, seq_len=64, samples_per_row=2, mixture={"image": 1.0, "text": 1.0}, max_images=2)


def _host_batch(config, microbatches):
    return SyntheticBatches(config, DATA, microbatches=microbatches, codec=CODEC).batch_at(3)


def _loss_and_grads(config, pc, host):
    mesh = make_mesh(pc)
    model = create_model(config, mesh, pc, seed=0)
    table = rule_table(config, pc)
    batch = put_batch(host, mesh, leading=1, rule_table=table)
    with jax.set_mesh(mesh):
        if pc.pipeline > 1:
            from mllm_jax.train.pipelined_step import pipelined_loss_and_grad

            @nnx.jit
            def run(m, b):
                s, c, g = pipelined_loss_and_grad(m, b, mesh=mesh, parallel_config=pc)
                return s / c, g
        else:
            @nnx.jit
            def run(m, b):
                gdef, params, rest = nnx.split(m, trainable_filter(config), ...)

                def total(p):
                    mm = nnx.merge(gdef, p, rest)
                    sums, counts = zip(*[mm.loss(jax.tree.map(lambda x: x[i], b)) for i in range(pc.microbatches)])
                    return sum(sums) / sum(counts)

                return jax.value_and_grad(total)(params)

        loss, grads = run(model, batch)
    return float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(grads) if hasattr(grads, "flat_state") else grads)


# Every layout family in two runs: fsdp x context x tensor, and pipeline x data.
LAYOUTS = {
    "fsdp2_context2_tensor2": ParallelConfig(fsdp=2, context=2, tensor=2, microbatches=1,
                                             context_config=ContextConfig(block=16)),
    "pipeline2_data4": ParallelConfig(data=4, pipeline=2, microbatches=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_balanced_gives_the_row_bound_loss_and_gradients(name):
    pc = LAYOUTS[name]
    config = _config()
    host = _host_batch(config, pc.microbatches)
    if pc.context > 1:
        host, _ = permute_for_context(host, pc, leading=1)
    balanced = eb.balance_batch(host, config, pc, leading=1)
    # The oracle can fail: the balanced batch really moves instances (fewer encoder rows, other positions).
    assert balanced["encoder_inputs"]["vision"].shape[1] < host["encoder_inputs"]["vision"].shape[1]
    loss_r, grads_r = _loss_and_grads(config, pc, host)
    loss_b, grads_b = _loss_and_grads(config, pc, balanced)
    np.testing.assert_allclose(loss_b, loss_r, rtol=1e-6)
    flat_r, flat_b = jax.tree.leaves(grads_r), jax.tree.leaves(grads_b)
    assert len(flat_r) == len(flat_b) > 0
    for gr, gb in zip(flat_r, flat_b):
        np.testing.assert_allclose(gb, gr, rtol=1e-5, atol=1e-7)


def _brute_force_opt(costs, m):
    best = np.inf
    for combo in itertools.product(range(m), repeat=len(costs)):
        best = min(best, np.bincount(combo, weights=costs, minlength=m).max())
    return best


def test_assignment_meets_grahams_bounds_and_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for trial in range(40):
        m = int(rng.integers(2, 4))
        costs = rng.choice([1.0, 2.0, 3.0, 5.0, 8.0], size=int(rng.integers(m + 1, 8)))
        plan = assign(costs, m)
        opt = _brute_force_opt(costs, m)
        busiest = plan.loads.max()
        assert busiest <= (4 / 3 - 1 / (3 * m)) * opt + 1e-9, (costs, m, busiest, opt)
        assert busiest >= opt - 1e-9  # no assignment beats the optimum: the loads are real
        np.testing.assert_allclose(np.bincount(plan.device, weights=costs, minlength=m), plan.loads)
    # Large, long-tailed: the list-scheduling bound total/m + (1 - 1/m) max, and close to the lower bound.
    for m in (8, 64, 256):
        costs = rng.pareto(1.5, 20 * m) + 1.0
        plan = assign(costs, m)
        assert plan.loads.max() <= costs.sum() / m + (1 - 1 / m) * costs.max() + 1e-9
        assert plan.loads.max() <= 1.05 * lower_bound(costs, m)


def test_assignment_respects_the_count_cap_and_puts_each_instance_once():
    costs = np.asarray([9.0, 1, 1, 1, 1, 1, 1, 1])
    plan = assign(costs, 4, max_count=2)
    assert plan.counts.max() <= 2 and plan.counts.sum() == len(costs)
    for d in range(4):  # slots are 0..count-1 on every device
        assert sorted(plan.slot[plan.device == d]) == list(range(plan.counts[d]))
    with pytest.raises(ValueError, match="max_count=1 per device x 4 devices"):
        assign(costs, 4, max_count=1)


def test_balanced_batch_moves_every_feature_to_its_token():
    """Host-level: each placeholder token's feature row holds the same encoder input after the rewrite, the
    per-shard instance counts differ by at most one, and the static capacity is the bucket above them."""
    config = _config()
    pc = ParallelConfig(data=8, microbatches=2)
    host = _host_batch(config, 2)
    out = eb.balance_batch(host, config, pc, leading=1)
    t = config.features_per_instance("vision")
    for m in range(2):
        fi_old, fi_new = host["feature_index"]["vision"][m], out["feature_index"]["vision"][m]
        np.testing.assert_array_equal(fi_old >= 0, fi_new >= 0)
        sel = fi_old >= 0
        np.testing.assert_array_equal(fi_old[sel] % t, fi_new[sel] % t)
        np.testing.assert_array_equal(host["encoder_inputs"]["vision"][m][fi_old[sel] // t],
                                      out["encoder_inputs"]["vision"][m][fi_new[sel] // t])
        used = np.unique(fi_new[sel] // t)
        c = out["encoder_inputs"]["vision"].shape[1] // 8
        per_shard = np.bincount(used // c, minlength=8)
        assert per_shard.max() - per_shard.min() <= 1
    assert out["encoder_inputs"]["vision"].shape[1] == 8 * eb.capacity(per_shard.max())
    for key in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
        np.testing.assert_array_equal(out[key], host[key])


def test_balanced_rows_never_exceed_the_row_bound_layout():
    """65 of 80 slots used on one device: the bucket (96) would exceed the 80 rows the row-bound layout encodes."""
    config = _config()
    t = config.features_per_instance("vision")
    fi = np.full((1, 1, 65 * t), -1, np.int32)
    fi[0, 0] = np.arange(65 * t)
    batch = {"feature_index": {"vision": fi},
             "encoder_inputs": {"vision": np.random.default_rng(0).normal(size=(1, 80, 8, 8, 3)).astype(np.float32)}}
    out = eb.balance_batch(batch, config, ParallelConfig(), leading=1)
    assert out["encoder_inputs"]["vision"].shape[1] == 80
    np.testing.assert_array_equal(out["encoder_inputs"]["vision"][0, :65], batch["encoder_inputs"]["vision"][0, :65])


def test_capacity_buckets_and_mode_errors():
    assert [eb.capacity(n) for n in (0, 1, 2, 3, 4, 5, 7, 9, 13, 17)] == [1, 1, 2, 3, 4, 6, 8, 12, 16, 24]
    with pytest.raises(ValueError, match="encoder_balance must be one of .* got 'even'"):
        eb.check_mode("even")
    assert eb.encoder_shards(ParallelConfig(data=2, context=2, tensor=2), "vision") == 8
    assert eb.encoder_shards(ParallelConfig(data=2, tensor=4, rules={"encoders/vision": {"batch": "data"}}),
                             "vision") == 2


# ----------------------------------------------------------------------------------------------------------------
# Several processes (simulated here by threads, each one host with its rows; the real two-process run is
# tests/test_distributed_train.py): the same used set everywhere, the one-process plan's loads, pixels moved on
# device by one all_to_all.


def _hosts_balance(config, pc, mesh, data, step, hosts):  # data: a SyntheticBatches
    """Each simulated host's balance_host_rows on its rows of batch ``step``, the metadata exchange a barrier."""
    import threading

    from mllm_jax.data.batching import local_synthetic_batch

    per_host = data.cfg.batch_size // pc.microbatches // hosts
    blocks = pc.data * pc.fsdp // hosts
    sent, barrier, outs = [None] * hosts, threading.Barrier(hosts), [None] * hosts

    def run(h):
        def gather(v):
            sent[h] = v
            barrier.wait()
            return np.stack(sent)

        local = local_synthetic_batch(data, step, slice(h * per_host, (h + 1) * per_host))
        outs[h] = eb.balance_host_rows(local, config, pc, mesh, leading=1, processes=hosts, gather=gather,
                                       span=(h, hosts, blocks))

    threads = [threading.Thread(target=run, args=(h,)) for h in range(hosts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return outs


@pytest.mark.parametrize("layout", ["data8", "data2_fsdp2_tensor2"])
def test_several_processes_balance_like_one_and_move_pixels_on_device(layout):
    pc = {"data8": ParallelConfig(data=8, microbatches=2),
          "data2_fsdp2_tensor2": ParallelConfig(data=2, fsdp=2, tensor=2, microbatches=2)}[layout]
    config, hosts = _config(), 2
    mesh = make_mesh(pc)
    # 2 samples of 0-1 images a device: row-bound devices hold 0-2 images, balanced ones 1 (moves across hosts).
    data = SyntheticBatches(config, dataclasses.replace(DATA, batch_size=16), microbatches=pc.microbatches,
                            codec=CODEC)
    whole = data.batch_at(2)
    one = eb.balance_batch(whole, config, pc, leading=1)
    outs = _hosts_balance(config, pc, mesh, data, 2, hosts)
    r = outs[0][eb.RELAYOUT][("encoder_inputs", "vision")]
    for o in outs[1:]:  # every host computed the same exchange
        ro = o[eb.RELAYOUT][("encoder_inputs", "vision")]
        np.testing.assert_array_equal(ro.send, r.send)
        np.testing.assert_array_equal(ro.recv, r.recv)
    # The global batch the hosts' rows stage into (placement stitches them in span order), then placed and moved.
    glob = {k: np.concatenate([o[k] for o in outs], axis=1) for k in ("input_ids", "labels", "positions",
                                                                      "segment_ids", "span_ids")}
    glob["feature_index"] = {"vision": np.concatenate([o["feature_index"]["vision"] for o in outs], axis=1)}
    glob["encoder_inputs"] = {"vision": np.concatenate([o["encoder_inputs"]["vision"] for o in outs], axis=1)}
    glob[eb.RELAYOUT] = outs[0][eb.RELAYOUT]
    placed = eb.place(glob, mesh, leading=1, rule_table=rule_table(config, pc))
    x_new = np.asarray(placed["encoder_inputs"]["vision"])
    assert x_new.shape == one["encoder_inputs"]["vision"].shape  # the one-process layout: S x C rows
    # The oracle can fail: instances really cross hosts (host h's row-bound devices are h * S / 2 ...).
    a_, b_ = np.nonzero((r.send >= 0).any(axis=(0, 3)))
    assert (a_ // 4 != b_ // 4).any(), r.send
    # The compiled move: one all_to_all whose S chunks per device hold M x K rows each, and no all-gather.
    from mllm_jax.parallel.instance_balance import _mover

    axes = tuple(a for a in ("data", "fsdp", "tensor") if mesh.shape[a] > 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axes))
    args = [jax.device_put(a, sharding) for a in (glob["encoder_inputs"]["vision"], r.send, r.recv)]
    with jax.set_mesh(mesh):
        hlo = _mover(mesh, axes).lower(*args).compile().as_text()
    (a2a,) = [line for line in hlo.splitlines() if " all-to-all(" in line]
    M, K = r.send.shape[0], r.send.shape[-1]
    assert a2a.count(f"f32[{M},{K},8,8,3]") >= 8 and "all-gather" not in hlo, a2a[:300]
    t = config.features_per_instance("vision")
    x_old, S = whole["encoder_inputs"]["vision"], 8
    C = x_new.shape[1] // S
    for m in range(pc.microbatches):
        fi_old, fi_new = whole["feature_index"]["vision"][m], glob["feature_index"]["vision"][m]
        np.testing.assert_array_equal(fi_old >= 0, fi_new >= 0)
        sel = fi_old >= 0
        np.testing.assert_array_equal(fi_old[sel] % t, fi_new[sel] % t)
        # Every token's feature row holds the pixels it held in the row-bound batch.
        np.testing.assert_array_equal(x_new[m][fi_new[sel] // t], x_old[m][fi_old[sel] // t])
        # Busiest / mean encoder work per device equals the one-process plan's (the loads as a multiset).
        many = np.bincount(np.unique(fi_new[sel] // t) // C, minlength=S)
        single = np.bincount(np.unique(one["feature_index"]["vision"][m][sel] // t) // C, minlength=S)
        np.testing.assert_array_equal(np.sort(many), np.sort(single))
        # Only what must move moves: instances beyond their row-bound device's planned count.
        n_rb = x_old.shape[1] // S
        own = np.bincount(np.unique(fi_old[sel] // t) // n_rb, minlength=S)
        moved = int((r.send[m] >= 0).sum())
        assert moved == int(np.maximum(own - np.sort(many)[::-1][np.argsort(np.argsort(-own, kind="stable"))],
                                       0).sum())


def test_localize_keeps_loads_and_moves_only_the_surplus():
    from mllm_jax.parallel.instance_balance import localize, pair_count

    rng = np.random.default_rng(1)
    for _ in range(20):
        m = int(rng.integers(2, 9))
        costs = rng.choice([1.0, 2.0, 5.0], size=int(rng.integers(1, 40)))
        source = rng.integers(0, m, len(costs))
        plan = assign(costs, m)
        local = localize(plan, costs, source)
        np.testing.assert_allclose(np.sort(local.loads), np.sort(plan.loads))  # busiest / mean unchanged
        np.testing.assert_allclose(np.bincount(local.device, weights=costs, minlength=m), local.loads)
        for d in range(m):
            assert sorted(local.slot[local.device == d]) == list(range(local.counts[d]))
        # Per cost class, moved = sum over devices of (own - kept), kept = min(own, the device's planned count).
        for v in np.unique(costs):
            sel = costs == v
            own = np.bincount(source[sel], minlength=m)
            planned = np.bincount(local.device[sel], minlength=m)
            assert int((local.device[sel] != source[sel]).sum()) == int(np.maximum(own - planned, 0).sum())
        pairs = np.zeros((m, m), int)  # instances sent from each device to each other one, counted one by one
        for i in range(len(costs)):
            pairs[source[i], local.device[i]] += source[i] != local.device[i]
        assert pair_count(local, source) == pairs.max()
