"""HF interop against PyTorch transformers (CPU, fp32, tiny random configs built here: no downloads).

Oracles: transformers' own forward passes on the same weights (logits, last hidden states), transformers loading
the directories we write, and bit-identical tensors after a save/load round trip.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.hf import load_pretrained, save_pretrained
from mllm_jax.hf.safetensors_io import CheckpointReader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLM_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)
VISION_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                 patch_size=8)
WHISPER_KW = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=6,
                  max_target_positions=8, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  decoder_start_token_id=1)


def _randomize(model, seed=0):
    """Random weights large enough that every term matters (the default init leaves norms at 1 and biases at 0).
    Whisper's fixed sinusoidal position table is left as it is: it is not a learned weight."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def _save(model, tmp_path, name, **kw):
    path = str(tmp_path / name)
    model.save_pretrained(path, **kw)
    return path


def _ids(seed=0, shape=(2, 10), vocab=64):
    return np.random.default_rng(seed).integers(0, vocab, shape)


LLM_CASES = {
    "llama3_rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM_KW, rope_scaling=LLAMA3_ROPE)),
    "llama_tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM_KW, tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLM_KW)),
    # a window shorter than the sequence, so it binds
    "mistral_window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**LLM_KW, sliding_window=3)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**LLM_KW, head_dim=8)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**LLM_KW, head_dim=8, sliding_window=4)),
}


@pytest.mark.parametrize("case", sorted(LLM_CASES))
def test_llm_logits_match_transformers(tmp_path, case):
    hf = _randomize(LLM_CASES[case]())
    ids = _ids()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = load_pretrained(_save(hf, tmp_path, case))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), ref, atol=1e-4, rtol=1e-4)
    if case == "llama_tied":
        assert not hasattr(ours, "lm_head") and ours.config.tie_embeddings


def test_vision_last_hidden_state_matches_transformers(tmp_path):
    pixels = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    for name, hf in (("clip", transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW))),
                     ("siglip", transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION_KW)))):
        hf = _randomize(hf)
        with torch.no_grad():
            ref = hf(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        ours = load_pretrained(_save(hf, tmp_path, name))
        out = np.asarray(ours(jnp.asarray(pixels)))
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4, err_msg=name)


def test_whisper_encoder_matches_transformers(tmp_path):
    hf = _randomize(transformers.WhisperModel(transformers.WhisperConfig(**WHISPER_KW)))
    mel = np.random.default_rng(2).standard_normal((2, 12, 8)).astype(np.float32)  # [N, frames, n_mels]
    with torch.no_grad():
        ref = hf.encoder(torch.tensor(mel.transpose(0, 2, 1))).last_hidden_state.numpy()
    ours = load_pretrained(_save(hf, tmp_path, "whisper"))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(mel))), ref, atol=1e-4, rtol=1e-4)


def _tiny_llava(vision_model_type="clip_vision_model", strategy="default"):
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type=vision_model_type, **VISION_KW),
        text_config=dict(model_type="llama", **LLM_KW),
        image_token_index=63, vision_feature_layer=-2, vision_feature_select_strategy=strategy,
        image_seq_length=4,
    )
    return _randomize(transformers.LlavaForConditionalGeneration(cfg))


def _llava_inputs(n_image_tokens):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 60, (1, 12))
    ids[0, 2 : 2 + n_image_tokens] = 63
    pixels = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)
    return ids, pixels


def _our_llava_batch(ids, pixels, n_features):
    """The contract batch for one image, with the plain causal mask the pretrained LLaVA uses (span ids 0)."""
    b, s = ids.shape
    fi = np.full((b, s), -1, np.int32)
    fi[ids == 63] = np.arange(n_features)
    return {"input_ids": jnp.asarray(ids, jnp.int32), "positions": jnp.asarray(np.arange(s)[None], jnp.int32),
            "segment_ids": jnp.ones((b, s), jnp.int32), "span_ids": jnp.zeros((b, s), jnp.int32),
            "encoder_inputs": {"vision": jnp.asarray(pixels)}, "feature_index": {"vision": jnp.asarray(fi)}}


def test_llava_logits_with_an_image_match_transformers(tmp_path):
    hf = _tiny_llava()
    ids, pixels = _llava_inputs(4)  # 16x16 / 8x8 patches = 4 tokens, class token dropped ("default")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    model = load_pretrained(_save(hf, tmp_path, "llava"))
    assert model.config.encoders["vision"].select_layer == -2
    logits = model.llm.logits(model(_our_llava_batch(ids, pixels, 4)))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- export


def _flat_params(module):
    from flax import nnx

    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_llm_save_roundtrip_and_transformers_reload(tmp_path):
    for case in ("gemma2", "qwen2", "llama3_rope"):
        hf = _randomize(LLM_CASES[case]())
        ours = load_pretrained(_save(hf, tmp_path, case))
        out_dir = str(tmp_path / f"{case}_ours")
        save_pretrained(ours, out_dir, max_shard_bytes=20_000)  # forces a sharded checkpoint with an index
        assert os.path.isfile(os.path.join(out_dir, "model.safetensors.index.json"))
        again = load_pretrained(out_dir)
        a, b = _flat_params(ours), _flat_params(again)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
        assert type(reloaded) is type(hf)
        ids = _ids(5)
        with torch.no_grad():
            np.testing.assert_allclose(reloaded(torch.tensor(ids)).logits.numpy(),
                                       np.asarray(ours(jnp.asarray(ids))), atol=1e-4, rtol=1e-4, err_msg=case)


def test_encoders_and_llava_export_reload_in_transformers(tmp_path):
    pixels = np.random.default_rng(4).standard_normal((1, 16, 16, 3)).astype(np.float32)
    pt = torch.tensor(pixels.transpose(0, 3, 1, 2))
    for name, cls, hf_cfg in (("clip", transformers.CLIPVisionModel, transformers.CLIPVisionConfig),
                              ("siglip", transformers.SiglipVisionModel, transformers.SiglipVisionConfig)):
        ours = load_pretrained(_save(_randomize(cls(hf_cfg(**VISION_KW))), tmp_path, name))
        save_pretrained(ours, str(tmp_path / f"{name}_ours"))
        back = cls.from_pretrained(str(tmp_path / f"{name}_ours")).eval()
        with torch.no_grad():
            np.testing.assert_allclose(back(pixel_values=pt).last_hidden_state.numpy(),
                                       np.asarray(ours(jnp.asarray(pixels))), atol=1e-4, rtol=1e-4, err_msg=name)

    ours = load_pretrained(_save(_randomize(transformers.WhisperModel(transformers.WhisperConfig(**WHISPER_KW))),
                                 tmp_path, "whisper"))
    save_pretrained(ours, str(tmp_path / "whisper_ours"))
    back = transformers.WhisperModel.from_pretrained(str(tmp_path / "whisper_ours")).eval()
    mel = np.random.default_rng(5).standard_normal((1, 12, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(back.encoder(torch.tensor(mel.transpose(0, 2, 1))).last_hidden_state.numpy(),
                                   np.asarray(ours(jnp.asarray(mel))), atol=1e-4, rtol=1e-4)

    model = load_pretrained(_save(_tiny_llava(), tmp_path, "llava"))
    save_pretrained(model, str(tmp_path / "llava_ours"))
    back = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "llava_ours")).eval()
    ids, pixels = _llava_inputs(4)
    with torch.no_grad():
        ref = back(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.llm.logits(model(_our_llava_batch(ids, pixels, 4)))), ref,
                               atol=1e-4, rtol=1e-4)


def test_lora_is_merged_on_export(tmp_path):
    from flax import nnx

    from mllm_jax.config import LoRAConfig

    hf = _randomize(LLM_CASES["qwen2"]())
    ours = load_pretrained(_save(hf, tmp_path, "qwen2"), lora=LoRAConfig(rank=2, alpha=4.0, targets=("q", "down")))
    for p, v in nnx.to_flat_state(nnx.state(ours)):  # give the zero-initialised B matrices a real update
        if p[-1] == "lora_b":
            v.set_value(0.1 * jax.random.normal(jax.random.key(len(p)), v.get_value().shape))
    ids = _ids(6)
    save_pretrained(ours, str(tmp_path / "merged"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        ref = back(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the adapters changed something, so the test could fail
        assert np.abs(hf(torch.tensor(ids)).logits.numpy() - ref).max() > 1e-2


# ------------------------------------------------------------------------------------------- streaming, errors


@pytest.mark.slow
def test_load_into_a_sharded_layout(tmp_path):
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import logical_rules

    hf = _randomize(LLM_CASES["llama3_rope"]())
    path = _save(hf, tmp_path, "llama", max_shard_size="20KB")  # sharded by transformers, with an index
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    pc = ParallelConfig(fsdp=2, tensor=2, data=2)
    mesh = make_mesh(pc)
    ours = load_pretrained(path, mesh=mesh, logical_rules=logical_rules("llm", pc))
    q = ours.layers.attn.q.kernel.get_value()
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    # each device holds only its shard: fewer bytes than the whole tensor
    assert max(s.data.nbytes for s in q.addressable_shards) < q.nbytes
    reference = load_pretrained(path)
    for k, v in _flat_params(reference).items():
        np.testing.assert_array_equal(_flat_params(ours)[k], v, err_msg=k)
    # (numerics of the loaded model are the unsharded load's, checked against transformers above)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="pretrained directory not found: /nonexistent"):
        load_pretrained("/nonexistent")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"config.json not found: .*empty/config.json"):
        load_pretrained(str(tmp_path / "empty"))

    path = _save(_randomize(LLM_CASES["qwen2"]()), tmp_path, "qwen2")
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump({**cfg, "model_type": "falcon"}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported Hugging Face architecture model_type='falcon'; supported: llama"):
        load_pretrained(path)
    json.dump({**cfg, "intermediate_size": 40}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight': checkpoint shape \(48, 32\) "
                                         r"does not match the shape the config implies, \(40, 32\)"):
        load_pretrained(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"no safetensors weights in .*qwen2: expected .*model.safetensors"):
        load_pretrained(path)


def test_whisper_positions_must_be_the_sinusoids(tmp_path):
    hf = transformers.WhisperModel(transformers.WhisperConfig(**WHISPER_KW))
    with torch.no_grad():
        hf.encoder.embed_positions.weight.add_(1.0)
    with pytest.raises(ValueError, match="encoder.embed_positions.weight differs from Whisper's sinusoidal table"):
        load_pretrained(_save(hf, tmp_path, "whisper"))


def test_safetensors_reader_reads_bf16_like_torch(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    got = CheckpointReader(str(tmp_path)).get("w").astype(np.float32)
    np.testing.assert_array_equal(got, t.float().numpy())
