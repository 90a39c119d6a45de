"""The package owns one import root and coexists with Hugging Face's packages.

transformers 5.x imports Hugging Face's ``kernels`` package; a top-level ``kernels/`` of ours shadowed it whenever the
repository root was on sys.path (pytest, ``python -`` from the root) and every transformers model import crashed.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run from the repository root, root first on sys.path: exactly where the shadowing happened.
_SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import mllm_jax, mllm_jax.kernels, mllm_jax.parallel
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
import kernels  # Hugging Face's, as transformers needs it
assert not kernels.__file__.startswith({root!r}), kernels.__file__
tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)
ids = torch.arange(8)[None]
for cfg in (LlamaConfig(**tiny), MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **tiny)):
    model = (LlamaForCausalLM if isinstance(cfg, LlamaConfig) else MixtralForCausalLM)(cfg)
    assert model(ids).logits.shape == (1, 8, 64)
print("OK", mllm_jax.__file__)
"""


def test_transformers_models_import_beside_mllm_jax_from_repo_root():
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=ROOT)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_mllm_jax_is_the_only_top_level_package():
    top = sorted(d for d in os.listdir(ROOT)
                 if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    assert top == ["mllm_jax"], top


def test_public_names_kept():
    from mllm_jax import kernels
    from mllm_jax.data.tokenizer import build_tokenizer
    from mllm_jax.hf import load_pretrained, save_pretrained
    from mllm_jax.parallel.context import plan

    assert callable(kernels.attention) and kernels.TokenMeta._fields == ("positions", "segment_ids", "span_ids")
    assert all(callable(f) for f in (build_tokenizer, load_pretrained, save_pretrained, plan))
