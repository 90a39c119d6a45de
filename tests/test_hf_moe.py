"""Mixtral, Qwen2-MoE and Qwen3-MoE from transformers: tiny random models saved by transformers
(``save_pretrained``: one tensor per expert, as hub checkpoints) load into mllm_jax.LLM with logits equal to the
PyTorch model's to 1e-4 (float32, routing included: the top-k choice is the same or the logits differ by O(1));
saved back, transformers loads them to the same logits. The config maps round-trip.

Also the auxiliary loss: transformers' ``load_balancing_loss_func`` on the very router logits of one layer equals
mllm_jax.moe.load_balancing_loss of that layer's statistics."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.hf import config_map as cm  # noqa: E402
from mllm_jax.hf.pretrained import load_pretrained, save_pretrained  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16,
                       norm_topk_prob=True)),
    # Qwen2-MoE with a dense first layer (mlp_only_layers) and renormalised gates: the mixed layer pattern.
    "qwen2_moe_mixed": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[0])),
}


def _torch_model(family: str, seed: int = 0):
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # random (not the default ~0) router and norm weights, so routing and qk-norm matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_matches_transformers_and_saves_back(family, tmp_path):
    model = _torch_model(family)
    model.save_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(str(tmp_path / "hf"))
    cfg = ours.config
    assert cfg.n_experts == 4 and cfg.experts_per_token == 2
    if family == "qwen2_moe_mixed":
        assert cfg.moe_layers == (1,) and cfg.moe_first_dense_layers == 1
    want = _torch_logits(model, IDS)
    got = np.asarray(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(IDS)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Saved back by us, loaded by transformers: the same model.
    save_pretrained(ours, str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "config.json") as f:
        hf = json.load(f)
    assert hf["model_type"] == family.replace("_mixed", "")
    back = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(_torch_logits(back, IDS), want, rtol=1e-4, atol=1e-4)
    explicit = lambda c: dataclasses.replace(c, head_dim=c.resolved_head_dim)  # noqa: E731
    assert explicit(cm.llm_from_hf(hf)) == explicit(cfg)


def test_aux_loss_is_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mllm_jax import moe
    from mllm_jax.config import LLMConfig

    rng = np.random.default_rng(1)
    for e, k in ((4, 2), (8, 3)):
        cfg = LLMConfig(d_model=16, n_experts=e, experts_per_token=k)
        x = rng.normal(size=(40, 16)).astype(np.float32)
        w = rng.normal(size=(16, e)).astype(np.float32)
        logits, probs, _, ids = moe.route(jnp.asarray(w), jnp.asarray(x), cfg)
        stats = moe.router_stats(logits, probs, ids, e)
        want = float(load_balancing_loss_func((torch.as_tensor(np.asarray(logits)),), e, k))
        assert float(moe.load_balancing_loss(stats, k)) == pytest.approx(want, rel=1e-6)
        z = float(jnp.mean(jax.nn.logsumexp(logits, -1) ** 2))
        assert float(moe.z_loss(stats)) == pytest.approx(z, rel=1e-6)


def test_unsupported_moe_options_are_refused():
    hf = cm.llm_to_hf(cm.llm_from_hf({**COMMON, "model_type": "qwen3_moe", "num_experts": 4,
                                      "num_experts_per_tok": 2, "moe_intermediate_size": 16}))
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"] and hf["norm_topk_prob"] is True
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\] must be the first k layers"):
        cm.llm_from_hf({**COMMON, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 16, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match=r"router_jitter_noise=0.1"):
        cm.llm_from_hf({**COMMON, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
                        "router_jitter_noise": 0.1})
