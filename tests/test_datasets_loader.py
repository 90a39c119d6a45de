"""Packing independence (kernels.mask), feature_index/encoder rows, buckets, resume, host sharding."""

import json

import numpy as np
import pytest

from mllm_jax.kernels import TokenMeta, mask
from mllm_jax.data.batching import check_placeholders
from mllm_jax.data.datasets import DatasetConfig, Loader, local_data_ranks, make_source, pack_rows
from test_datasets_helpers import T_VISION, byte_tokenizer, dataset_config, tiny_model_config, write_llava

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _loader(path, tmp, state=None, **kw):
    ranks = kw.pop("num_data_ranks", 2)
    mbs = kw.pop("microbatches", 2)
    pi, pc = kw.pop("process_index", 0), kw.pop("process_count", 1)
    cfg = dataset_config(path, media_root=str(tmp / "images"), **kw)
    mc = tiny_model_config()
    return Loader(make_source(cfg, byte_tokenizer, mc), cfg, mc, num_data_ranks=ranks, microbatches=mbs,
                  process_index=pi, process_count=pc, state=state)


def test_pack_rows_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2]
    plan = pack_rows(lengths, 3, 10)
    assert sorted(i for row in plan for i in row) == list(range(5))
    assert all(sum(lengths[i] for i in row) <= 10 for row in plan)
    assert pack_rows(lengths, 2, 10) is None  # 26 tokens > 2 * 10


def test_packed_batch_is_independent_per_sample(tmp_path):
    path, values = write_llava(str(tmp_path), n=16, seed=3)
    with _loader(path, tmp_path, global_batch_samples=8, rows_per_microbatch=1, seq_len_buckets=(128, 512),
                 instance_buckets=(8, 16)) as loader:
        batch = next(loader)
        ids_per_mb = loader.last_sample_ids
    mc = tiny_model_config()
    src = make_source(dataset_config(path, media_root=str(tmp_path / "images")), byte_tokenizer, mc)
    by_id = {src.sample_id(i): src.prepare(i) for i in range(len(src))}
    packed_rows = 0
    for m in range(batch["input_ids"].shape[0]):
        mb = {k: (v[m] if not isinstance(v, dict) else {n: a[m] for n, a in v.items()}) for k, v in batch.items()}
        check_placeholders(mb, mc)  # mllm_jax.data's validator: placeholders <-> feature_index agree
        meta = TokenMeta(mb["positions"], mb["segment_ids"], mb["span_ids"])
        allowed = np.asarray(mask(meta, meta))
        seg = mb["segment_ids"]
        cross = seg[:, :, None] != seg[:, None, :]
        assert not (allowed & cross).any(), "a token attends to another packed sample"
        row_ids = [i for rank in ids_per_mb[m] for i in rank]
        seen = []
        for r in range(seg.shape[0]):
            packed_rows += seg[r].max() > 1
            for s in range(1, seg[r].max() + 1):
                tok = np.flatnonzero(seg[r] == s)
                ids = mb["input_ids"][r, tok]
                # Oracle: the sample on its own (positions 0..L-1, one segment): same tokens, labels, mask.
                match = [k for k, p in by_id.items() if np.array_equal(p.input_ids, ids) and k not in seen]
                assert match, "packed segment is not one of the samples"
                p = by_id[match[0]]
                seen.append(match[0])
                np.testing.assert_array_equal(mb["labels"][r, tok], p.labels())
                np.testing.assert_array_equal(mb["positions"][r, tok], np.arange(len(tok)))
                alone = TokenMeta(mb["positions"][r:r + 1, tok], np.ones((1, len(tok)), np.int32),
                                  mb["span_ids"][r:r + 1, tok])
                np.testing.assert_array_equal(allowed[r][np.ix_(tok, tok)], np.asarray(mask(alone, alone))[0])
                # Each image run gathers the right image: feature_index // T is its encoder row.
                fi = mb["feature_index"]["vision"][r, tok]
                rows = [fi[p.instances[k].start] // T_VISION for k in range(len(p.instances))]
                for k, row in enumerate(rows):
                    np.testing.assert_array_equal(fi[p.instances[k].start:p.instances[k].start + T_VISION],
                                                  row * T_VISION + np.arange(T_VISION))
                    want = (np.asarray(values[p.sample_id][k], np.float32) / 255 - MEAN) / STD
                    np.testing.assert_allclose(mb["encoder_inputs"]["vision"][row, 0, 0], want, rtol=1e-5)
                spans = mb["span_ids"][r, tok][mb["span_ids"][r, tok] > 0]
                assert len(np.unique(spans)) == len(p.instances)
            # Span ids are unique per instance within the row (across packed samples too).
            nz = mb["span_ids"][r][mb["span_ids"][r] > 0]
            assert len(np.unique(nz)) == (mb["input_ids"][r] == 3).sum() // T_VISION
        assert sorted(seen) == sorted(row_ids)
    assert packed_rows > 0, "the test must exercise rows holding several samples"


def test_bucket_is_the_smallest_that_fits(tmp_path):
    path, _ = write_llava(str(tmp_path), n=12, seed=1)
    buckets = (32, 64, 96, 128, 256, 512)
    with _loader(path, tmp_path, seq_len_buckets=buckets, shuffle=False) as loader:
        for _ in range(3):
            batch = next(loader)
            s = batch["input_ids"].shape[-1]
            # Oracle: the lengths of the packed samples (segments) re-packed at the next smaller bucket.
            seg = batch["segment_ids"]
            fits_smaller = True
            smaller = [b for b in buckets if b < s]
            for m in range(seg.shape[0]):
                for rank in range(2):
                    rows = seg[m, rank * 2:(rank + 1) * 2]
                    lengths = [int((row == k).sum()) for row in rows for k in range(1, row.max() + 1)]
                    if smaller and pack_rows(lengths, 2, smaller[-1]) is None:
                        fits_smaller = False
            assert not smaller or not fits_smaller
            n_img = (batch["input_ids"] == 3).reshape(2, 2, -1).sum(-1) // T_VISION  # [M, rank]
            assert batch["encoder_inputs"]["vision"].shape[1] // 2 == min(b for b in (2, 4, 8) if b >= n_img.max())


def _take(loader, k):
    out = []
    for _ in range(k):
        out.append((next(loader), loader.last_sample_ids))
    return out


def _assert_same(a, b):
    for (ba, ia), (bb, ib) in zip(a, b):
        assert ia == ib
        for key in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
            np.testing.assert_array_equal(ba[key], bb[key])
        np.testing.assert_array_equal(ba["encoder_inputs"]["vision"], bb["encoder_inputs"]["vision"])
        np.testing.assert_array_equal(ba["feature_index"]["vision"], bb["feature_index"]["vision"])


@pytest.mark.parametrize("method", ["balanced", "random"])
def test_resume_continues_the_exact_order(tmp_path, method):
    path, _ = write_llava(str(tmp_path), n=10, seed=2, bad=("corrupt", "mismatch"))
    kw = dict(microbatch_assignment=method, global_batch_samples=4)
    with _loader(path, tmp_path, **kw) as loader:
        _take(loader, 2)
        state = json.loads(json.dumps(loader.state()))  # JSON round trip, as the checkpoint stores it
        expected = _take(loader, 4)  # crosses the epoch boundary (12 records, 4 per batch)
    assert state["position"] > 0
    with _loader(path, tmp_path, state=state, **kw) as resumed:
        got = _take(resumed, 4)
    _assert_same(expected, got)
    with _loader(path, tmp_path, **dict(kw, seed=1)) as other:
        with pytest.raises(ValueError, match="seed"):
            _loader(path, tmp_path, state=other.state(), **kw)


def test_every_good_sample_once_per_epoch(tmp_path):
    path, _ = write_llava(str(tmp_path), n=15, seed=4, bad=("missing", "too_long"))
    with _loader(path, tmp_path, global_batch_samples=5, seq_len_buckets=(128, 256, 512)) as loader:
        ids = [i for _ in range(3) for _ in [next(loader)] for mb in loader.last_sample_ids for r in mb for i in r]
        assert loader.state()["epoch"] == 0  # 15 good of 17 records: still the first epoch
    assert sorted(ids) == sorted(f"s{i}" for i in range(15))


def test_host_shards_concatenate_to_the_single_host_batch(tmp_path):
    path, _ = write_llava(str(tmp_path), n=12, seed=5)
    kw = dict(num_data_ranks=4, microbatches=2, global_batch_samples=8)
    with _loader(path, tmp_path, **kw) as whole:
        full = [next(whole) for _ in range(2)]
    parts = []
    for host in range(2):
        with _loader(path, tmp_path, process_index=host, process_count=2, **kw) as part:
            parts.append([next(part) for _ in range(2)])
    for step in range(2):
        for key in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts], axis=1), full[step][key])
        for key in ("encoder_inputs", "feature_index"):
            np.testing.assert_array_equal(np.concatenate([p[step][key]["vision"] for p in parts], axis=1),
                                          full[step][key]["vision"])


def test_local_ranks_and_config_errors():
    assert list(local_data_ranks(8, 1, 4)) == [2, 3]
    assert list(local_data_ranks(2, 3, 4)) == [1]
    with pytest.raises(ValueError, match="num_data_ranks"):
        local_data_ranks(3, 0, 2)
    with pytest.raises(ValueError, match="microbatch_assignment"):
        DatasetConfig(microbatch_assignment="lpt").validate()
    with pytest.raises(ValueError, match="on_bad_sample"):
        DatasetConfig(on_bad_sample="ignore").validate()


def test_assignment_is_gin_configurable():
    gin_setup = pytest.importorskip("mllm_jax.gin_setup")
    if DatasetConfig not in gin_setup.CONFIG_CLASSES:
        pytest.skip("mllm_jax.gin_setup does not register DatasetConfig yet (its owner adds it to CONFIG_CLASSES)")
    import gin

    with gin.unlock_config():
        gin_setup.parse(gin_params=["DatasetConfig.microbatch_assignment = 'random'"])
        try:
            assert gin_setup.build(DatasetConfig).microbatch_assignment == "random"
        finally:
            gin.clear_config()
    assert DatasetConfig().microbatch_assignment == "balanced"
