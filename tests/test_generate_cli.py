"""generate.py end to end on a run trained here (tests/generate_testlib.py: 8 fake devices, data=2 x fsdp=2 x
context=2), and the restore behind it: the multi-device checkpoint read onto one device outside any mesh gives the
training mesh's own held-out loss."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from generate_testlib import trained_workdir
from subprocess_env import child_env
from test_hf_export import _hf_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # a run trained on 8 devices and generate.py / export subprocesses


def _generate(*flags):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *flags], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def run():
    from mllm_jax.train import workdir

    path = trained_workdir()
    return workdir.open_run(path)


def test_restored_model_runs_outside_the_mesh_and_reproduces_the_runs_eval_loss(run):
    """The oracle: eval_loss that the run computed on its 8-device mesh at its last step."""
    from mllm_jax.data import SyntheticBatches
    from mllm_jax.data.batching import unstack_first
    from mllm_jax.train.metrics import read_metrics

    leaves = jax.tree.leaves(run.model)
    assert all(len(x.devices()) == 1 for x in leaves if hasattr(x, "devices"))
    batch = unstack_first(SyntheticBatches(run.config.model, run.config.data, split="eval").batch_at(0))
    loss_sum, count = jax.jit(lambda b: run.model.loss(b))(batch)
    want = read_metrics(run.workdir)[-1]["eval_loss"]
    assert float(loss_sum / count) == pytest.approx(want, rel=1e-5)
    logits = run.model.llm(np.array([[1, 5, 6]], np.int32))  # the call that raised ShardingTypeError
    assert logits.shape == (1, 3, run.config.model.llm.vocab_size)


def test_synthetic_captions_and_scores(run):
    out = _generate(f"--workdir={run.workdir}", "--synthetic=5")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    scores = json.loads(lines[-1])
    assert {"caption_exact", "word_accuracy", "samples", "step", "image_shape"} <= set(scores)
    assert scores["samples"] == 5 and scores["step"] == run.step
    # The printed captions, scored again here, give the JSON's numbers; and they are the library's captions.
    from mllm_jax.data.tokenizer import TextCodec
    from mllm_jax.train import captions

    pairs = [(line.split("'")[1], line.split("'")[3]) for line in lines[:-1]]
    codec = TextCodec(run.tokenizer)
    samples = captions.held_out_samples(run.config.model, run.config.data, 5, codec)
    assert [a for _, a in pairs] == [s.answer for s in samples]
    want = captions.generate_captions(run.model, captions.make_builder(run.config.model, run.config.data, codec),
                                      samples)
    assert [c for c, _ in pairs] == want
    answers = [s.answer for s in samples]
    assert scores == {**captions.caption_scores(want, answers), **captions.slot_scores(want, answers), "samples": 5,
                      "step": run.step}


def test_image_file_caption(run, tmp_path):
    from PIL import Image

    from mllm_jax.data.tokenizer import TextCodec
    from mllm_jax.train import captions

    codec = TextCodec(run.tokenizer)
    sample = captions.held_out_samples(run.config.model, run.config.data, 1, codec)[0]
    pixels = np.round((sample.media[0][1] + 1.0) / 2.0 * 255.0).astype(np.uint8)
    path = str(tmp_path / "shape.png")
    Image.fromarray(pixels).save(path)
    out = _generate(f"--workdir={run.workdir}", f"--image={path}")
    assert out.returncode == 0, out.stderr[-3000:]
    image = captions.load_image(path, run.config.model.encoders["vision"])
    np.testing.assert_allclose(image, sample.media[0][1], atol=1.0 / 255 + 1e-6)  # only the 8-bit rounding
    want = captions.generate_captions(run.model, captions.make_builder(run.config.model, run.config.data, codec),
                                      [captions.image_sample([image], "<image> describe the image .")])
    assert out.stdout.strip().splitlines()[-1] == want[0] and want[0]

    bad = _generate(f"--workdir={run.workdir}", f"--image={path}", "--prompt=<image> <image> describe the image .")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "2 <image> placeholders for 1 --image" in bad.stderr, bad.stderr[-2000:]


def test_text_only_prompt_and_no_input(run):
    # A prompt without <image> and no --image: text-only generation, as the model computes it in-process.
    from mllm_jax.data.tokenizer import TextCodec
    from mllm_jax.train import captions

    out = _generate(f"--workdir={run.workdir}", "--prompt=describe the image .")
    assert out.returncode == 0, out.stderr[-3000:]
    codec = TextCodec(run.tokenizer)
    want = captions.generate_captions(run.model, captions.make_builder(run.config.model, run.config.data, codec),
                                      [captions.image_sample([], "describe the image .")])
    assert out.stdout.strip().splitlines()[-1] == want[0]
    none = _generate(f"--workdir={run.workdir}")  # the default prompt has an <image>, and none is given
    assert none.returncode != 0 and "give --image" in none.stderr and "text-only --prompt" in none.stderr


def test_training_eval_reports_the_generated_caption_exact_match(run):
    """The loop's eval_caption_exact and eval_caption_word_accuracy (decoded by the model where it lies, sharded on the
    training mesh data=2 x fsdp=2 x context=2: the prompt's prefill context-parallel) equal the scores of the restored
    checkpoint of the same step on one device, on the same held-out samples."""
    from mllm_jax.data.tokenizer import TextCodec
    from mllm_jax.train import captions
    from mllm_jax.train.metrics import read_metrics

    last = read_metrics(run.workdir)[-1]
    assert "eval_accuracy" in last and last["step"] == run.step
    codec = TextCodec(run.tokenizer)
    samples = captions.held_out_samples(run.config.model, run.config.data, run.config.train.eval_captions, codec)
    want = captions.caption_exact(run.model, captions.make_builder(run.config.model, run.config.data, codec), samples,
                                  max_new_tokens=captions.EVAL_CAPTION_TOKENS)
    assert (last["eval_caption_exact"], last["eval_caption_word_accuracy"]) == (want["caption_exact"],
                                                                                want["word_accuracy"])
    assert want["word_accuracy"] > 0  # some words right after a few steps: the comparison is not of two zeros


def test_trained_run_exports_with_its_tokenizer_and_generates_the_same_in_transformers(run, tmp_path):
    """python -m mllm_jax.hf.export on the run; transformers' LLaVA generate gives our greedy tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mllm_jax import decode
    from mllm_jax.data.tokenizer import TextCodec
    from mllm_jax.train import captions

    path, out = run.workdir, str(tmp_path / "hf")
    res = subprocess.run([sys.executable, "-m", "mllm_jax.hf.export", f"--workdir={path}", f"--out={out}"], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))
    codec = TextCodec(run.tokenizer)
    samples = captions.held_out_samples(run.config.model, run.config.data, 2, codec)
    batch = captions.prompt_batch(captions.make_builder(run.config.model, run.config.data, codec), samples)
    n = decode.prompt_lengths(batch)
    assert (n == n[0]).all()  # image prompts have one length: no padding on either side
    batch["span_ids"][:] = 0  # transformers' LLaVA attends causally over the image
    ours = decode.generate(run.model, batch, max_new_tokens=6).tokens
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = batch["input_ids"][:, :n[0]]
    pixels = batch["encoder_inputs"]["vision"].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(_hf_greedy(hf, ids, pixel_values=torch.tensor(pixels)), ours)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(ours[0]).split() == codec.decode(ours[0]).split()
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == codec.token_id("<eos>")
