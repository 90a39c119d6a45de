"""Caption with a trained model: the newest checkpoint of a run's workdir, its config and tokenizer.

  python generate.py --workdir=runs/vlm_tiny --image=shape.png [--prompt="<image> describe the image ."]
  python generate.py --workdir=runs/vlm_tiny --synthetic=32      # held-out samples of the run's data mixture
  python generate.py --workdir=runs/vlm_tiny --prompt="hello ."   # a text-only prompt (no <image>)

--image prints the caption. --synthetic=N captions N held-out samples (the run's own task mixture, never trained on),
prints each next to its answer and ends with one JSON line: {"caption_exact", "word_accuracy", "samples", "step"}.
Greedy by default; --temperature/--top_k/--top_p/--seed sample. Runs on one device whatever layout trained the model
(mllm_jax.train.workdir). Guide: docs/generate.md.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a run's workdir (config.gin, tokenizer.json, checkpoints/)")
flags.DEFINE_multi_string("image", [], "image file(s) to caption (PNG, JPEG, ...), resized to the model's size")
flags.DEFINE_string("prompt", "<image> describe the image .", "the user's turn; one <image> per --image")
flags.DEFINE_integer("synthetic", 0, "caption this many held-out synthetic samples and report caption_exact, "
                     "word_accuracy and per task and word (image_shape, video_motion, ...) as the last line (JSON)")
flags.DEFINE_integer("max_new_tokens", 16, "tokens to generate at most (the caption ends at <eos>)")
flags.DEFINE_float("temperature", 0.0, "0: greedy")
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
flags.DEFINE_float("top_p", 1.0, "sample within the smallest set of tokens of this probability")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_bool("traceback", False, "on a refused input print the whole traceback instead of the one-line error")

def main(argv) -> int:
    from mllm_jax.cli import one_line_errors  # (jax starts later: the backends read XLA_FLAGS when first used)

    return one_line_errors(lambda: _main(argv), traceback=FLAGS.traceback)


def _main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if FLAGS.image and FLAGS.synthetic:
        raise app.UsageError("give --image (one or more) or --synthetic=N, not both")
    n_placeholders = FLAGS.prompt.split().count("<image>")
    if not FLAGS.image and not FLAGS.synthetic and n_placeholders:
        raise app.UsageError(f"give --image (one per <image> of --prompt), --synthetic=N, or a text-only --prompt "
                             f"(no <image>); got neither and --prompt={FLAGS.prompt!r}")
    if FLAGS.image and n_placeholders != len(FLAGS.image):
        raise ValueError(f"--prompt has {n_placeholders} <image> placeholders for {len(FLAGS.image)} --image "
                         f"file(s): {FLAGS.prompt!r}")
    from mllm_jax import cpu_flags

    cpu_flags.apply()
    logging.set_verbosity(logging.WARNING)
    from mllm_jax import decode
    from mllm_jax.data.tokenizer import TextCodec
    from mllm_jax.data.train_data import uses_real_data
    from mllm_jax.train import captions, workdir

    run = workdir.open_run(FLAGS.workdir)
    cfg = run.config
    if uses_real_data(cfg.dataset):
        raise ValueError(f"generate.py captions runs on the synthetic data; this run trained on "
                         f"DatasetConfig.path={cfg.dataset.path!r}")
    codec = TextCodec(run.tokenizer)
    builder = captions.make_builder(cfg.model, cfg.data, codec)
    sampling = decode.SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
    if FLAGS.synthetic:
        samples = captions.held_out_samples(cfg.model, cfg.data, FLAGS.synthetic, codec)
        got = _captions(run.model, builder, samples, sampling)
        for s, c in zip(samples, got):
            print(f"{s.task}: {c!r} (answer {s.answer!r})")
        scores = captions.caption_scores(got, [s.answer for s in samples])
        slots = captions.slot_scores(got, [s.answer for s in samples])  # per task and word (image_shape, ...)
        print(json.dumps({**scores, **slots, "samples": len(samples), "step": run.step}))
        return 0
    if FLAGS.image and "vision" not in cfg.model.encoders:
        raise ValueError(f"--image needs a model with a 'vision' encoder; this one has {sorted(cfg.model.encoders)}")
    images = [captions.load_image(p, cfg.model.encoders["vision"]) for p in FLAGS.image]  # none: a text-only prompt
    sample = captions.image_sample(images, FLAGS.prompt)
    print(_captions(run.model, builder, [sample], sampling)[0])
    return 0


def _captions(model, builder, samples, sampling):
    from mllm_jax.train import captions

    return captions.generate_captions(model, builder, samples, max_new_tokens=FLAGS.max_new_tokens, sampling=sampling)


if __name__ == "__main__":
    app.run(main)
