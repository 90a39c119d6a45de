"""The current LLM families as LLMConfig options: Qwen2.5, Qwen3 (q/k norm), Llama 3.1 / 3.2 (llama3 rope, tied
embeddings), Gemma 3 text (local/global layers with a rope each, linear rope scaling on the global layers, q/k norm
with Gemma's (1 + w), query_pre_attn_scalar, post norms, embedding scale).

Oracle: transformers' PyTorch models on tiny random configs (fp32): our logits after load_pretrained equal theirs to
1e-4, and the directory save_pretrained writes loads back into the same transformers class with the same logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.config import LLMConfig
from mllm_jax.hf import load_pretrained, save_pretrained
from mllm_jax.hf.config_map import llm_from_hf, llm_to_hf
from tests.model_testlib import jit_call

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=48, max_position_embeddings=64)
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8, rope_theta=500000.0)
GEMMA3_KW = dict(KW, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
                 query_pre_attn_scalar=16, rope_local_base_freq=100.0, rope_theta=10000.0)

# Gemma 3 text as LLMConfig options: a local layer then a global one, each with its own rope
GEMMA3_LLM = LLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, head_dim=8,
                       sliding_window=3, sliding_window_pattern=2, query_pre_attn_scalar=16.0, post_norms=True,
                       norm_scale_plus_one=True, embed_scale=True, tie_embeddings=True, activation="gelu_tanh",
                       qk_norm=True, rope_theta=10000.0, rope_linear_factor=8.0, rope_local_theta=100.0)

CASES = {
    # Qwen2.5 is model_type qwen2 (q/k/v bias); the small ones tie their embeddings and use theta 1e6
    "qwen2_5": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **KW, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**KW, head_dim=16)),
    "llama3_1": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**KW, rope_parameters=LLAMA31_ROPE)),
    "llama3_2": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **KW, rope_parameters=LLAMA31_ROPE, tie_word_embeddings=True)),
    # 1B-style (no scaling) and 4B-style (linear scaling of the global layers' rope)
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3_KW)),
    "gemma3_linear": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **GEMMA3_KW, rope_scaling=dict(rope_type="linear", factor=8.0))),
}


def _randomize(model, seed=0):
    """Weights large enough that every term matters (the default init leaves norms at 1 / 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_and_export_reloads(tmp_path, case):
    hf = _randomize(CASES[case]())
    ids = np.random.default_rng(0).integers(0, 64, (2, 10))  # longer than the Gemma 3 window (3)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(np.asarray(jit_call(lambda m, i: m(i), ours, jnp.asarray(ids))), ref, atol=1e-4,
                               rtol=1e-4)

    save_pretrained(ours, str(tmp_path / "ours"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), ref, atol=1e-4, rtol=1e-4)


def test_family_options_are_read():
    """What each family turns on, read from the transformers configs (so a parity pass is not an accident of
    defaults), and the gemma3 multimodal config's text_config is accepted as it stands."""
    g = llm_from_hf(CASES["gemma3_linear"]().config.to_dict())
    assert (g.qk_norm, g.post_norms, g.norm_scale_plus_one, g.embed_scale) == (True, True, True, True)
    assert (g.rope_local_theta, g.rope_theta, g.rope_linear_factor) == (100.0, 10000.0, 8.0)
    assert (g.sliding_window, g.sliding_window_pattern, g.query_pre_attn_scalar) == (3, 2, 16.0)
    text = transformers.Gemma3Config(text_config=dict(GEMMA3_KW)).to_dict()["text_config"]
    assert llm_from_hf(text) == llm_from_hf(CASES["gemma3"]().config.to_dict())
    q = llm_from_hf(CASES["qwen3"]().config.to_dict())
    assert (q.qk_norm, q.qkv_bias, q.norm_scale_plus_one, q.head_dim) == (True, False, False, 16)
    assert llm_to_hf(q)["model_type"] == "qwen3"
    assert llm_to_hf(g)["model_type"] == "gemma3_text"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        llm_from_hf({**CASES["gemma3"]().config.to_dict(), "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="rope_local_theta"):
        llm_to_hf(llm_from_hf(CASES["gemma3"]().config.to_dict()), "gemma2")
    with pytest.raises(ValueError, match="attention_bias"):
        llm_from_hf({**CASES["qwen3"]().config.to_dict(), "attention_bias": True})


def test_gemma3_cached_decode_equals_the_uncached_forward():
    """Decode picks each layer's rope by its window (local base vs scaled global) and applies Gemma's (1 + w) q/k
    norms as the training forward does: every greedy step's logits equal the forward on prompt + tokens."""
    from flax import nnx

    from mllm_jax import decode
    from mllm_jax.llm import LLM
    from tests.test_generate import _check_against_uncached, _randomize

    llm = _randomize(LLM(GEMMA3_LLM, rngs=nnx.Rngs(0)))
    prompts = [np.array([5, 9, 17, 33, 2, 41, 8]), np.array([7, 3, 50])]
    out = decode.generate(llm, decode.text_batch(prompts), max_new_tokens=5, return_logits=True)
    _check_against_uncached(llm, prompts, out, 5)


def test_gemma3_pipeline_stage_layer_equals_the_layer_stack():
    """The pipeline's one-layer function (window chosen per layer by lax.switch) rotates each layer with its own
    rope: applied layer by layer it equals the scanned stack."""
    import jax

    from mllm_jax.kernels.meta import TokenMeta
    from mllm_jax.llm import LLM
    from tests.test_generate import _randomize
    from tests.model_testlib import build

    llm = _randomize(build(LLM, GEMMA3_LLM))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)))
    meta = TokenMeta.causal(2, 10, xp=np)

    def both(m, ids, meta):
        values, _ = m.layer_params()
        emb = m.embed_tokens(ids)
        layer_fn, codes = m.stage_layer()
        h = emb
        for i in range(GEMMA3_LLM.n_layers):
            h = layer_fn({"weights": jax.tree.map(lambda a: a[i], values), "window": codes[i]}, h, meta)
        return h, m.apply_layers(values, emb, meta)

    staged, stacked = jit_call(both, llm, ids, meta)
    np.testing.assert_allclose(np.asarray(staged), np.asarray(stacked), atol=1e-5, rtol=1e-5)
