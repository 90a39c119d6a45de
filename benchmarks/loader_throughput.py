"""Throughput of mllm_jax.data.datasets.Loader on LLaVA files it writes (PNG images, conversation JSON) vs a step rate.

Writes --samples records (0..4 images each, JPEG-free PNGs of --image_size px with noise so they do not compress to
nothing; text from mllm_jax.data's synthetic vocabulary, tokenised by its TextCodec), then times --batches global
batches after one warm-up batch: every stage of the loader runs (planning, balanced assignment, packing, decoding,
resizing, normalising). The training step consumes global_batch_samples per step, so the loader keeps up when
samples_per_s >= step_rate * global_batch_samples.

Final JSON line (also written to --out): samples_per_s, required_samples_per_s, headroom (ratio), keeps_up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import report  # noqa: E402
from mllm_jax.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from mllm_jax.data.tokenizer import TextCodec, vocabulary  # noqa: E402
from mllm_jax.data.datasets import DatasetConfig, Loader, make_source  # noqa: E402


def write_dataset(root: str, n: int, image_size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = [w for w in vocabulary() if not w.startswith("<")]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records, k = [], 0
    for i in range(n):
        names = []
        for _ in range(int(rng.choice(5, p=[0.3, 0.4, 0.15, 0.1, 0.05]))):
            img = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(root, "images", f"{k}.png"))
            names.append(f"{k}.png")
            k += 1
        q = " ".join(rng.choice(words, int(rng.integers(4, 40))))
        a = " ".join(rng.choice(words, int(min(rng.lognormal(3.5, 1.0), 600)) + 1))
        rec = {"id": str(i), "conversations": [{"from": "human", "value": "<image> " * len(names) + q},
                                               {"from": "gpt", "value": a}]}
        if names:
            rec["image"] = names
        records.append(rec)
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--image_size", type=int, default=224, help="stored and model image size")
    ap.add_argument("--global_batch", type=int, default=32)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--step_rate", type=float, default=1.0, help="training steps per second to keep up with")
    ap.add_argument("--assignment", default="balanced")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.batches, args.global_batch = 96, 3, 16
    codec = TextCodec()
    pids = codec.placeholder_ids()
    model = ModelConfig(
        llm=LLMConfig(vocab_size=codec.vocab_size, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512),
        encoders={"vision": VisionConfig(image_size=args.image_size, patch_size=14, d_model=256, n_layers=2,
                                         n_heads=4, d_ff=512)},
        projectors={"vision": ProjectorConfig()}, placeholder_ids={"vision": pids["vision"]})
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        path = write_dataset(root, args.samples, args.image_size)
        write_s = time.perf_counter() - t0
        cfg = DatasetConfig(path=path, media_root=os.path.join(root, "images"), global_batch_samples=args.global_batch,
                            rows_per_microbatch=4, seq_len_buckets=(2048, 4096, 8192), instance_buckets=(4, 8, 16, 32),
                            num_workers=args.workers, microbatch_assignment=args.assignment, prefetch=2)
        source = make_source(cfg, codec, model)
        with Loader(source, cfg, model, num_data_ranks=args.ranks, microbatches=args.microbatches,
                    process_index=0, process_count=1, pad_id=codec.pad_id) as loader:
            next(loader)  # warm-up: thread pool, first plan
            t0 = time.perf_counter()
            images = 0
            for _ in range(args.batches):
                batch = next(loader)
                images += int((batch["feature_index"]["vision"] >= 0).sum()) // model.encoders["vision"].num_features
            elapsed = time.perf_counter() - t0
            bad = loader.bad_sample_counts
    samples_per_s = args.batches * args.global_batch / elapsed
    required = args.step_rate * args.global_batch
    result = {"benchmark": "loader_throughput", "samples_per_s": samples_per_s, "images_per_s": images / elapsed,
              "batches_per_s": args.batches / elapsed, "required_samples_per_s": required,
              "headroom": samples_per_s / required, "keeps_up": bool(samples_per_s >= required),
              "step_rate": args.step_rate, "global_batch": args.global_batch, "image_size": args.image_size,
              "workers": args.workers, "assignment": args.assignment, "bad_samples": bad,
              "dataset_write_s": write_s, "cpu_count": os.cpu_count()}
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
