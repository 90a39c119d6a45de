"""A frozen encoder's feature cache (mllm_jax.data.encoder_cache) on a real dataset: a tiny LLaVA-JSON dataset (PNG
images written with PIL). Its instances are keyed by the sha256 of their image files (datasets.Loader
.last_instance_keys), so the first epoch encodes and stores, the second hits every entry with the very bits the
pixels gave, a resumed loader hits too, an edited image file or other preprocessing is a miss, and train.py with the
cache has the uncached run's losses."""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.build import create_model
from mllm_jax.data import encoder_cache as ec
from mllm_jax.data.datasets import DatasetConfig, Loader, make_source
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from tests.test_encoder_cache import _config
from tests.train_main import TINY, losses, run_main

N_RECORDS = 16  # 8 samples a global batch: steps 1-2 are the first epoch, 3-4 the second


def _image(i: int, shade: int = 0):
    """A distinct 16 x 16 picture per record (no two files share bytes, so no two instances share a key)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (16, 16), (20 + 10 * i, 20, 20 + shade))
    ImageDraw.Draw(img).rectangle([3, 3, 12, 12], fill=((60 * i) % 256, 200, (90 * i) % 256))
    return img


def _write_dataset(root) -> tuple[str, str]:
    from mllm_jax.data.tokenizer import build_tokenizer

    os.makedirs(root / "images", exist_ok=True)
    records = []
    for i in range(N_RECORDS):
        _image(i).save(root / "images" / f"{i}.png")
        colour = ("red", "green", "blue", "yellow")[i % 4]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image> describe the image ."},
            {"from": "gpt", "value": f"a {colour} square at the middle center"}]})
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    tokenizer = root / "tokenizer.json"
    build_tokenizer().save(str(tokenizer))
    return str(path), str(tokenizer)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("llava_cache"))


def _dataset_config(path: str, **kw) -> DatasetConfig:
    return DatasetConfig(path=path, media_root=os.path.join(os.path.dirname(path), "images"), format="llava",
                         global_batch_samples=8, rows_per_microbatch=1, seq_len_buckets=(64,), instance_buckets=(1,),
                         num_workers=1, **kw)


def _used_rows(batch, config) -> np.ndarray:
    fi = batch["feature_index"]["vision"][0]
    return np.unique(fi[fi >= 0] // config.features_per_instance("vision"))


def test_loader_cache_hits_next_epoch_bit_identical_and_edited_image_misses(dataset, tmp_path):
    from tokenizers import Tokenizer

    json_path, tok_path = dataset
    images = os.path.join(os.path.dirname(json_path), "images")
    tokenizer = Tokenizer.from_file(tok_path)
    config = _config()
    pc = ParallelConfig(data=8)
    mesh = make_mesh(pc)
    model = create_model(config, mesh, pc, seed=0)
    enc = ec.FrozenEncoders(model, mesh, pc, ["vision"])
    dc = _dataset_config(json_path)
    source = make_source(dc, tokenizer, config)
    cache = ec.open_cache(str(tmp_path / "cache"), config, source.preprocessing(), enc)

    def run(loader, steps):
        out = []
        for _ in range(steps):
            batch = next(loader)
            keys = loader.last_instance_keys
            out.append((batch, keys, cache.features(batch, keys, enc)))
        return out

    with Loader(source, dc, config, num_data_ranks=8, process_index=0, process_count=1) as loader:
        first = run(loader, 2)  # the first epoch: every record once
        state = loader.state()
    assert (state["epoch"], state["position"]) == (0, N_RECORDS)  # the epoch is used up; the next batch starts 1
    assert cache.counts == {"hits": 0, "misses": N_RECORDS, "corrupt": 0}
    feats_of = {}  # image digest -> the features its first (encoded) use gave
    for batch, keys, out in first:
        used = _used_rows(batch, config)
        assert len(used) == 8
        k = keys["vision"][0]
        assert all(len(k[s]) == 64 for s in used)  # sha256 hex of the file
        for s in used:
            feats_of[k[s]] = out["encoder_features"]["vision"][0, s]
        # Against the model's own encoder on the batch's pixels (another program: float round-off only).
        with jax.set_mesh(mesh):
            ref = np.asarray(nnx.jit(lambda m, x: m.encoder_features("vision", x))(
                model, batch["encoder_inputs"]["vision"][0]))
        np.testing.assert_allclose(out["encoder_features"]["vision"][0][used], ref[used], rtol=1e-5, atol=1e-6)
    assert len(feats_of) == N_RECORDS
    digests = {f"{i}.png": hashlib.sha256(open(os.path.join(images, f"{i}.png"), "rb").read()).hexdigest()
               for i in range(N_RECORDS)}
    assert set(feats_of) == set(digests.values())

    # One image edited in place; the loader resumes at the checkpointed state (a new process would do the same).
    edited = os.path.join(images, "5.png")
    _image(5, shade=40).save(edited)
    new_digest = hashlib.sha256(open(edited, "rb").read()).hexdigest()
    assert new_digest != digests["5.png"]
    with Loader(source, dc, config, num_data_ranks=8, process_index=0, process_count=1, state=state) as loader:
        second = run(loader, 2)
    # Every unchanged image hits; the edited one is a miss under its new key, never its old features.
    assert cache.counts == {"hits": N_RECORDS - 1, "misses": N_RECORDS + 1, "corrupt": 0}
    seen = set()
    for batch, keys, out in second:
        used = _used_rows(batch, config)
        k = keys["vision"][0]
        got = out["encoder_features"]["vision"][0]
        # The pixels path, the very program the misses ran (FrozenEncoders), on this batch's pixels.
        pixels = enc("vision", batch["encoder_inputs"]["vision"][0][used])
        for j, s in enumerate(used):
            seen.add(k[s])
            assert np.array_equal(got[s], pixels[j]), f"row {s}: cached features differ from the pixels path"
            if k[s] != new_digest:
                assert np.array_equal(got[s], feats_of[k[s]])
        assert not got[np.setdiff1d(np.arange(got.shape[0]), used)].any()
    assert new_digest in seen and digests["5.png"] not in seen
    assert not np.array_equal(feats_of[digests["5.png"]],
                              [o["encoder_features"]["vision"][0, s] for b, kk, o in second
                               for s in _used_rows(b, config) if kk["vision"][0][s] == new_digest][0])

    # Other preprocessing (the image normalisation) is another cache folder: nothing stale is read.
    other = make_source(dataclasses.replace(dc, image_mean=(0.5, 0.5, 0.5)), tokenizer, config)
    assert other.preprocessing() != source.preprocessing()
    moved = ec.open_cache(str(tmp_path / "cache"), config, other.preprocessing(), enc)
    assert moved.stores["vision"].directory != cache.stores["vision"].directory
    assert not os.listdir(moved.stores["vision"].directory)


def test_train_with_cache_on_real_data_resumes_with_the_uncached_losses(dataset, tmp_path):
    """train.py, LLaVA stage 1 (configs/vlm_tiny_frozen.gin) on the real dataset: with DataConfig.encoder_cache,
    stopped after the first epoch (step 2) and resumed to step 4, the second epoch hits every entry (metrics'
    encoder_cache counts), writes none, and the losses are the uncached run's."""
    json_path, tok_path = dataset
    params = TINY + [
        f'DatasetConfig.path = "{json_path}"', f'DatasetConfig.media_root = "{os.path.dirname(json_path)}/images"',
        'DatasetConfig.format = "llava"', "DatasetConfig.global_batch_samples = 8",
        "DatasetConfig.rows_per_microbatch = 1", "DatasetConfig.seq_len_buckets = (64,)",
        "DatasetConfig.instance_buckets = (1,)", "DatasetConfig.num_workers = 1",
        f'DataConfig.tokenizer_path = "{tok_path}"', "ParallelConfig.data = 8",
        "TrainConfig.steps = 4", "TrainConfig.checkpoint_every = 2",
    ]
    gin_file = "configs/vlm_tiny_frozen.gin"
    ref = losses(run_main(str(tmp_path / "plain"), params, gin_file=gin_file))
    cache = tmp_path / "cache"
    cached = params + [f"DataConfig.encoder_cache = '{cache}'"]
    first = run_main(str(tmp_path / "cached"), cached + ["TrainConfig.stop_at_step = 2"], gin_file=gin_file)
    assert [r["encoder_cache"] for r in first] == [{"hits": 0, "misses": 8 * s, "corrupt": 0} for s in (1, 2)]
    (folder,) = os.listdir(cache)
    mtimes = {e: os.stat(cache / folder / e).st_mtime_ns for e in os.listdir(cache / folder)}
    assert len(mtimes) == N_RECORDS
    rows = run_main(str(tmp_path / "cached"), cached, gin_file=gin_file)
    resumed = [r for r in rows if r["step"] > 2]
    # The resumed process counts from zero: the second epoch is all hits.
    assert [r["encoder_cache"] for r in resumed] == [{"hits": 8 * s, "misses": 0, "corrupt": 0} for s in (1, 2)]
    assert {e: os.stat(cache / folder / e).st_mtime_ns for e in os.listdir(cache / folder)} == mtimes
    got = losses(rows)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        np.testing.assert_allclose(got[step], ref[step], rtol=2e-5)
