"""Layouts written for any slice: a -1 mesh axis takes the devices left, microbatches=-1 one row per shard."""

from __future__ import annotations

import os

import pytest

from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.fill import fill_layout
from mllm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("devices,want_fsdp,want_mb", [(1, 1, 128), (4, 4, 32), (64, 64, 2), (256, 256, None)])
def test_fsdp_fills_the_devices_and_microbatches_one_row_per_shard(devices, want_fsdp, want_mb):
    pc = ParallelConfig(fsdp=-1, microbatches=-1)
    if want_mb is None:  # 128 rows cannot be split over 256 shards: refused, naming both numbers
        with pytest.raises(ValueError, match=r"data x fsdp = 1 x 256 = 256.*batch_size 128"):
            fill_layout(pc, devices, 128)
        return
    got = fill_layout(pc, devices, 128)
    assert (got.fsdp, got.microbatches, got.num_devices) == (want_fsdp, want_mb, devices)
    assert got.microbatches * got.data * got.fsdp == 128


def test_fill_keeps_the_other_axes_and_refuses_what_cannot_fill():
    got = fill_layout(ParallelConfig(data=-1, tensor=2, microbatches=4), 16, 64)
    assert (got.data, got.tensor, got.microbatches) == (8, 2, 4)
    assert fill_layout(ParallelConfig(fsdp=2), 8, 16) == ParallelConfig(fsdp=2)  # nothing to fill: as given
    with pytest.raises(ValueError, match=r"tensor=3.*= 3\) do not divide the 8 devices"):
        fill_layout(ParallelConfig(fsdp=-1, tensor=3), 8, 16)
    with pytest.raises(ValueError, match="at most one.*data=-1, fsdp=-1"):
        fill_layout(ParallelConfig(data=-1, fsdp=-1), 8, 16)
    with pytest.raises(ValueError, match="real dataset"):
        fill_layout(ParallelConfig(microbatches=-1), 8, None)


def test_the_7b_recipes_fill_any_slice():
    """llava_7b and valm_s give fsdp and microbatches as -1, so `--compile_only --target=<any slice>` and --dry_run
    on one device take the same file; the filled layout passes the run's own validation."""
    for recipe in ("llava_7b", "valm_s"):
        cfg = loop.load_run_config([os.path.join(ROOT, f"configs/{recipe}.gin")])
        assert cfg.parallel.fsdp == -1 and cfg.parallel.microbatches == -1, recipe
        for devices in (1, 4, 16, 64):
            filled = loop.for_devices(cfg, devices)
            loop.validate(filled, devices)
            assert filled.parallel.fsdp == devices
            assert filled.parallel.microbatches * devices == cfg.data.batch_size


def test_dry_run_of_a_layout_bigger_than_the_host_says_how_to_get_the_devices(tmp_path):
    # train.py --dry_run of expert=16 on this process's 8 CPU devices: refused naming the axes and the device count,
    # and pointing at --cpu_devices (the recipe's own layout needs its devices even for a dry run).
    from train_main import run_main

    with pytest.raises(ValueError, match=r"expert=16.*do not divide the 8 devices.*--cpu_devices=N"):
        run_main(str(tmp_path), ["ParallelConfig.fsdp = -1", "ParallelConfig.expert = 16"], flags=["--dry_run"])
