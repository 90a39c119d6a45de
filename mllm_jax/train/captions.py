"""Captions from a model of a synthetic-data run: prompts in the run's own chat template, greedy generation with the
KV cache (mllm_jax.decode), and the two scores: ``caption_exact`` (whole captions equal) and ``word_accuracy``
(answer words right at their place). Used by generate.py and by the training loop's ``eval_caption_exact``."""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax import decode
from mllm_jax.data import synthetic
from mllm_jax.data.batching import BatchBuilder, SyntheticBatches
from mllm_jax.data.tokenizer import EOS, PAD, TextCodec


def prompt_batch(builder: BatchBuilder, samples: list) -> dict:
    """A right-padded contract batch of the samples' prompts: the training template (BatchBuilder) cut where the
    answer starts, so the model is asked exactly as it was taught (<bos> <user> prompt <assistant>)."""
    batch = builder.build(samples)
    for row, sample in enumerate(samples):
        start = builder.sample_tokens(sample)[1]
        batch["input_ids"][row, start:] = builder.codec.pad_id
        for key in ("segment_ids", "span_ids", "positions"):
            batch[key][row, start:] = 0
        for fi in batch["feature_index"].values():
            fi[row, start:] = -1
    batch.pop("labels")
    return batch


def make_builder(model_config, data_config, codec: TextCodec) -> BatchBuilder:
    """A BatchBuilder with one sample per row (no packing) and rows long enough for any sample of the run."""
    return BatchBuilder(model_config, dataclasses.replace(data_config, samples_per_row=1), codec)


def generate_captions(model, builder: BatchBuilder, samples: list, *, max_new_tokens: int = 16,
                      batch_size: int = 16, sampling: decode.SamplingConfig = decode.SamplingConfig(),
                      context_config=None) -> list[str]:
    """Captions of ``samples`` (their answers are not shown to the model), up to <eos>; greedy by default.
    ``context_config``: the run's ContextConfig, for the context-parallel prefill on a mesh with `context` > 1."""
    codec = builder.codec
    eos, pad = codec.token_id(EOS), codec.token_id(PAD)
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        res = decode.generate(model, prompt_batch(builder, chunk), max_new_tokens=max_new_tokens,
                              stop_tokens=(eos,), pad_id=pad, sampling=sampling, context_config=context_config)
        for toks, n in zip(res.tokens, res.lengths):
            toks = [int(t) for t in toks[:n] if int(t) != eos]
            out.append(" ".join(codec.decode(toks).split()))
    return out


def caption_scores(captions: list[str], answers: list[str]) -> dict:
    """caption_exact: the fraction of captions equal to their answer (word by word); word_accuracy: the fraction of
    answer words generated at their place."""
    if len(captions) != len(answers):
        raise ValueError(f"{len(captions)} captions for {len(answers)} answers")
    exact = words = right = 0
    for c, a in zip(captions, answers):
        cw, aw = c.split(), a.split()
        exact += cw == aw
        words += len(aw)
        right += sum(x == y for x, y in zip(cw, aw))
    return {"caption_exact": exact / max(len(answers), 1), "word_accuracy": right / max(words, 1)}


# The words of a synthetic vision caption by place: "a red circle at the top left" / "a red circle moving left".
IMAGE_SLOTS = {"colour": 1, "shape": 2, "row": 5, "column": 6}
VIDEO_SLOTS = {"colour": 1, "shape": 2, "motion": 4}


def slot_scores(captions: list[str], answers: list[str]) -> dict:
    """Per task and word: {"image_shape": fraction of image captions with the answer's shape word at its place, ...,
    "video_motion": ...} over the answers that are synthetic image or video captions (the others are skipped)."""
    if len(captions) != len(answers):
        raise ValueError(f"{len(captions)} captions for {len(answers)} answers")
    right, seen = {}, {}
    for c, a in zip(captions, answers):
        cw, aw = c.split(), a.split()
        task, slots = (("video", VIDEO_SLOTS) if aw[3:4] == ["moving"] else
                       ("image", IMAGE_SLOTS) if aw[3:5] == ["at", "the"] else (None, {}))
        for word, i in slots.items():
            key = f"{task}_{word}"
            seen[key] = seen.get(key, 0) + 1
            right[key] = right.get(key, 0) + (cw[i:i + 1] == aw[i:i + 1])
    return {k: right[k] / seen[k] for k in seen}


def held_out_samples(model_config, data_config, n: int, codec: TextCodec) -> list:
    """The first ``n`` samples of the run's held-out ("eval") stream: its own task mixture, never trained on."""
    stream = SyntheticBatches(model_config, data_config, split="eval", codec=codec)
    return [stream.sample(i) for i in range(n)]


def caption_exact(model, builder: BatchBuilder, samples: list, *, max_new_tokens: int = 16,
                  context_config=None) -> dict:
    captions = generate_captions(model, builder, samples, max_new_tokens=max_new_tokens,
                                 context_config=context_config)
    return caption_scores(captions, [s.answer for s in samples])


def load_image(path: str, vision_config) -> np.ndarray:
    """An image file as the synthetic data's pixels: RGB resized to image_size x image_size, scaled to [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        size = vision_config.image_size
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return (np.asarray(im, np.float32) / 255.0 * 2.0 - 1.0).astype(np.float32)


def image_sample(images: list, prompt: str) -> synthetic.Sample:
    """A sample asking ``prompt`` (with one <image> per image) about ``images`` [H, W, C]; no answer."""
    return synthetic.Sample("image", prompt, "", [("vision", img) for img in images])


# The training loop's eval_caption_exact (TrainConfig.eval_captions held-out samples): short captions (and, where the
# layout needs a copy onto one device, a model small enough to copy).
EVAL_CAPTION_TOKENS = 10  # the longest synthetic answer ("a magenta triangle at the bottom center") + <eos> is 8
EVAL_CAPTION_MAX_PARAMS = 2**28  # above this the copy onto one device is not worth an evaluation


def eval_caption_scores(model, builder: BatchBuilder, samples: list, *, context_config=None) -> dict:
    """{"eval_caption_exact", "eval_caption_word_accuracy"} of greedy captions of ``samples`` by ``model`` as it is
    during training (arrays on the training mesh): decoded in place, sharded with the training layouts, where
    mllm_jax.decode supports the layout (data, fsdp, tensor, context: the prompt's prefill planned with the run's
    ``context_config``); otherwise (pipeline or expert axes) the parameters are copied onto one device and decoded
    outside the mesh. {} where that does not apply: several
    processes (the arrays span hosts), or a copy onto one device of a model above EVAL_CAPTION_MAX_PARAMS parameters."""
    import jax
    from flax import nnx

    from mllm_jax.train.workdir import on_one_device, outside_mesh

    if not samples or jax.process_count() > 1:
        return {}
    if decode.runs_sharded(model):
        scores = caption_exact(model, builder, samples, max_new_tokens=EVAL_CAPTION_TOKENS,
                               context_config=context_config)
    else:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        if n_params > EVAL_CAPTION_MAX_PARAMS:
            return {}
        with outside_mesh():
            scores = caption_exact(on_one_device(model), builder, samples, max_new_tokens=EVAL_CAPTION_TOKENS)
    return {"eval_caption_exact": scores["caption_exact"], "eval_caption_word_accuracy": scores["word_accuracy"]}
