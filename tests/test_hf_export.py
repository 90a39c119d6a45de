"""Export to Hugging Face, with transformers as the client: the exported directory loads in transformers and its
``generate`` gives the same greedy tokens as mllm_jax.decode for the same prompt (and image). Tiny random LLaVA and
LLMs (Gemma 2 with soft-caps and alternating windows, Mistral with a binding window: transformers' own cache is the
oracle of ours). The run trained in tests/generate_testlib.py is exported through ``python -m mllm_jax.hf.export`` in
tests/test_generate_cli.py (which owns that run, so the suite trains it once)."""

import numpy as np
import pytest
from flax import nnx

from mllm_jax import decode
from mllm_jax.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.hf.export import export
from mllm_jax.llm import LLM
from mllm_jax.multimodal import MultimodalModel
from test_generate import _randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
STEPS = 6


def _hf_greedy(hf, ids, **inputs):
    with torch.no_grad():
        g = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                        max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                        pad_token_id=0, **inputs)
    return g[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("cfg", [
    LLMConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, head_dim=8, sliding_window=4,
              sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=8.0, query_pre_attn_scalar=8.0,
              post_norms=True, norm_scale_plus_one=True, embed_scale=True, tie_embeddings=True,
              activation="gelu_tanh"),
    LLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=48, sliding_window=3),
], ids=["gemma2", "mistral"])
def test_exported_llm_generates_our_greedy_tokens_in_transformers(tmp_path, cfg):
    llm = _randomize(LLM(cfg, rngs=nnx.Rngs(0)))
    ids = np.random.default_rng(0).integers(1, 64, (2, 9))
    ours = decode.generate(llm, decode.text_batch(list(ids)), max_new_tokens=STEPS).tokens
    export(llm, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    np.testing.assert_array_equal(_hf_greedy(hf, ids), ours)


def _llava_config():
    return ModelConfig(
        llm=LLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
        encoders={"vision": VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                         select_layer=-2)},
        projectors={"vision": ProjectorConfig(kind="mlp")}, placeholder_ids={"vision": 63})


def _image_batch(ids, pixels):
    """LLaVA's prompt: the image's tokens expanded in the ids, attended causally (span 0) as transformers does."""
    b, s = ids.shape
    fi = np.full((b, s), -1, np.int32)
    fi[ids == 63] = np.arange((ids == 63).sum())
    return {"input_ids": ids.astype(np.int32), "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, s), np.int32), "span_ids": np.zeros((b, s), np.int32),
            "encoder_inputs": {"vision": pixels}, "feature_index": {"vision": fi}}


def test_exported_tiny_llava_generates_our_greedy_tokens_in_transformers(tmp_path):
    model = _randomize(MultimodalModel(_llava_config(), rngs=nnx.Rngs(0)), std=0.2)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 60, (2, 10))
    ids[:, 2:6] = 63  # 16x16 pixels in 8x8 patches: 4 image tokens each
    pixels = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    ours = decode.generate(model, _image_batch(ids, pixels), max_new_tokens=STEPS).tokens
    export(model, str(tmp_path))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    got = _hf_greedy(hf, ids, pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(got, ours)
