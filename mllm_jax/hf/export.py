"""A training run's workdir -> a Hugging Face directory that transformers loads (and generates with).

    python -m mllm_jax.hf.export --workdir=runs/vlm_tiny_clip --out=/tmp/hf_model [--dtype=bfloat16]

Writes config.json + model.safetensors (``save_pretrained``: LLaVA for a vision model with a CLIP/SigLIP tower and an
mlp projector; the LLM family's own architecture for a model without encoders), generation_config.json, and the
run's tokenizer as tokenizer.json + tokenizer_config.json + special_tokens_map.json (``PreTrainedTokenizerFast``).
The parameters come from the newest checkpoint, restored onto one device whatever layout trained them
(mllm_jax.train.workdir). What transformers cannot express is refused by ``save_pretrained``'s config maps naming the
option (e.g. a "vit" tower with its post-norm, which LLaVA's hidden-state feature never sees).

One semantic difference to know: LLaVA in transformers attends causally over an image's tokens, while our synthetic
data gives each image a span (its tokens see each other both ways). A run trained with spans therefore captions
differently in transformers; the exported weights are exact (``tests/test_hf_export.py`` checks greedy tokens equal
ours with the same, causal, attention). See docs/generate.md.
"""

from __future__ import annotations

import json
import os
import sys

from mllm_jax.hf.pretrained import save_pretrained

# The synthetic tokenizer's special tokens (mllm_jax.data.tokenizer), written into tokenizer_config.json when the
# tokenizer has them.
_SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def write_tokenizer(tokenizer, out: str) -> dict:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) of a ``tokenizers.Tokenizer``; returns the
    special tokens' ids found ({"bos_token_id": ..., ...})."""
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    special = {k: t for k, t in _SPECIAL.items() if tokenizer.token_to_id(t) is not None}
    extra = [t for t in ("<image>", "<audio>", "<user>", "<assistant>") if tokenizer.token_to_id(t) is not None]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces":
           False, **special}
    if extra:
        cfg["additional_special_tokens"] = extra
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return {k + "_id": tokenizer.token_to_id(t) for k, t in special.items()}


def export(model, out: str, *, tokenizer=None, dtype: str = "float32") -> None:
    """``model`` (arrays on one device) and its tokenizer -> ``out``, a directory transformers loads."""
    save_pretrained(model, out, dtype=dtype)
    ids = write_tokenizer(tokenizer, out) if tokenizer is not None else {}
    gen = {k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({**gen, "do_sample": False}, f, indent=2)
    if gen:  # transformers reads these from config.json too (e.g. the pad id for batched generate)
        path = os.path.join(out, "config.json")
        with open(path) as f:
            hf = json.load(f)
        hf.update(gen)
        if "text_config" in hf:
            hf["text_config"].update(gen)
        with open(path, "w") as f:
            json.dump(hf, f, indent=2)


def export_workdir(workdir: str, out: str, *, dtype: str = "float32", log=print) -> dict:
    """The newest checkpoint of the run in ``workdir`` -> ``out``; returns {"step", "out", "model_type"}."""
    # The workdir (config.gin, checkpoints) is a training run's: read with mllm_jax.train's own reader. This CLI
    # entry point is the one place in mllm_jax.hf that reaches up to mllm_jax.train, and only when run.
    from mllm_jax.train import workdir as run_workdir

    run = run_workdir.open_run(workdir)
    model = run.model
    if not run.config.model.encoders:
        model = model.llm  # a text-only run exports as its LLM family (LlamaForCausalLM, ...)
    export(model, out, tokenizer=run.tokenizer, dtype=dtype)
    with open(os.path.join(out, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    log(f"exported step {run.step} of {workdir} as {model_type} to {out}")
    return {"step": run.step, "out": out, "model_type": model_type}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mllm_jax.hf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run's workdir (config.gin, tokenizer.json, checkpoints/)")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--traceback", action="store_true", help="print the whole traceback on an error")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mllm_jax.cli import one_line_errors

    def run() -> int:
        export_workdir(args.workdir, args.out, dtype=args.dtype)
        return 0

    return one_line_errors(run, traceback=args.traceback)


if __name__ == "__main__":
    sys.exit(main())
