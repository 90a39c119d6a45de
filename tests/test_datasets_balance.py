"""Workload-balanced microbatch assignment against random/sequential baselines and closed-form bounds."""

import numpy as np
import pytest

from mllm_jax.data.datasets import (Capacity, assign, coefficient_of_variation, microbatch_loads, pack_rows,
                               predicted_step_time)


def llava_like(n, seed):
    """0..6 images per sample, long-tailed text; workload (encoder, LLM) roughly as a 7B LLM + frozen ViT-L."""
    rng = np.random.default_rng(seed)
    images = rng.choice(7, n, p=[0.3, 0.35, 0.12, 0.08, 0.06, 0.05, 0.04])
    text = np.minimum(rng.lognormal(5.0, 1.0, n).astype(int) + 16, 3000)
    tokens = text + 576 * images
    work = np.stack([images * 4.3e11, tokens * 4.0e10 + tokens.astype(float) ** 2 * 1e6], axis=1)
    return work, tokens, images


def _flat(a):
    return sorted(i for rank in a for mb in rank for i in mb)


@pytest.mark.parametrize("method", ["balanced", "sequential", "random"])
def test_every_sample_exactly_once(method):
    for seed in range(3):
        work, tokens, images = llava_like(97, seed)  # not a multiple of ranks x microbatches
        cap = Capacity(tokens, images[:, None], max_tokens=16384, max_instances=32,
                       fits=lambda ix, t=tokens: pack_rows([t[i] for i in ix], 2, 8192) is not None)
        a = assign(work, num_ranks=4, num_microbatches=3, method=method, seed=seed, capacity=cap)
        assert len(a) == 4 and all(len(r) == 3 for r in a)
        assert _flat(a) == list(range(97))
        for rank in a:
            for mb in rank:
                assert tokens[mb].sum() <= 16384 and images[mb].sum() <= 32
                assert pack_rows([tokens[i] for i in mb], 2, 8192) is not None


def test_balanced_beats_random_and_sequential():
    work, tokens, images = llava_like(256, 0)
    res = {}
    for method in ("random", "sequential", "balanced"):
        loads = microbatch_loads(assign(work, num_ranks=4, num_microbatches=4, method=method, seed=0), work)
        res[method] = (coefficient_of_variation(loads.sum(-1)), coefficient_of_variation(loads[..., 0]),
                       coefficient_of_variation(loads[..., 1]), predicted_step_time(loads, pipeline_stages=2))
    for k in range(4):
        assert res["balanced"][k] <= res["sequential"][k]
        assert res["balanced"][k] < res["random"][k]
    assert res["balanced"][0] * 5 < res["random"][0]  # the target, on this distribution


def test_single_objective_meets_the_lpt_bound():
    """Hierarchical LPT: every microbatch load <= mean + 2 * largest item (rank level, then microbatch level)."""
    rng = np.random.default_rng(7)
    w = rng.pareto(1.5, 300) + 0.1
    a = assign(w, num_ranks=5, num_microbatches=4)
    loads = microbatch_loads(a, w)[..., 0]
    assert loads.max() <= w.sum() / 20 + 2 * w.max()
    assert np.isclose(loads.sum(), w.sum())


def test_predicted_step_time_formula():
    loads = np.array([[[1.0, 4.0], [0.0, 2.0]], [[2.0, 1.0], [1.0, 1.0]]])  # [rank, mb, (enc, llm)]
    assert predicted_step_time(loads) == max(1 + 6, 3 + 2)
    # 1F1B over 2 stages: sum/P + (P-1) max/P.
    assert predicted_step_time(loads, pipeline_stages=2) == max(1 + 6 / 2 + 4 / 2, 3 + 2 / 2 + 1 / 2)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="method"):
        assign(np.ones(4), num_ranks=2, num_microbatches=1, method="lpt")
    tokens = np.full(4, 100)
    cap = Capacity(tokens, np.zeros((4, 1)), max_tokens=150)
    with pytest.raises(ValueError, match="capacity"):
        assign(np.ones(4), num_ranks=1, num_microbatches=2, capacity=cap)
    with pytest.raises(ValueError, match="fits in no microbatch"):
        assign(np.ones(4), num_ranks=1, num_microbatches=2, method="sequential", capacity=cap)
