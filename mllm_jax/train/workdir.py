"""A run's workdir, opened for inference: its config (config.gin, as train.py wrote it), tokenizer (tokenizer.json)
and the newest checkpoint's parameters restored onto **one device, outside any mesh**.

A training checkpoint restored into the training layout holds arrays typed with the training mesh's Explicit
axes: calling ``model.llm(ids)`` on them outside ``jax.set_mesh(mesh)`` raises a ShardingTypeError, and the mesh
needs the training job's device count. Here the parameters are read straight into single-device arrays (Orbax
reshards while reading), whatever layout and device count wrote them, so the model runs anywhere
(mllm_jax.decode, the HF export). ``on_one_device`` does the same for a model that is live on a mesh (the training
loop's evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass
class Run:
    config: object  # mllm_jax.train.loop.RunConfig
    model: object  # MultimodalModel on one device
    tokenizer: object  # tokenizers.Tokenizer
    step: int
    workdir: str


def outside_mesh():
    """A context with no mesh set (inside the training loop's jax.set_mesh): single-device arrays run unsharded."""
    return jax.set_mesh(jax.sharding.Mesh(np.empty((), dtype=object), ()))


def on_one_device(model, device=None):
    """A copy of ``model`` whose arrays sit whole on ``device`` (default: the first), typed with no mesh."""
    device = device or jax.devices()[0]
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, jax.sharding.SingleDeviceSharding(device))
    return nnx.merge(graphdef, state)


def load_config(workdir: str):
    """The RunConfig of the run in ``workdir`` from its config.gin (the bindings train.py wrote there)."""
    from mllm_jax.train.loop import load_run_config

    path = os.path.join(workdir, "config.gin")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: --workdir must be a directory train.py wrote (config.gin, "
                         f"tokenizer.json, checkpoints/); got {workdir!r}")
    return load_run_config([os.path.abspath(path)])


def load_tokenizer(workdir: str):
    from tokenizers import Tokenizer

    path = os.path.join(workdir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the run's tokenizer (train.py writes it at the start of a run)")
    return Tokenizer.from_file(path)


def restore_model(model_config, workdir: str, *, log=print):
    """(MultimodalModel on one device with the newest checkpoint's parameters, its step)."""
    from mllm_jax.multimodal import MultimodalModel
    from mllm_jax.train import init_from

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir!r} has no checkpoints/ directory: nothing to restore")
    abstract = nnx.eval_shape(lambda: MultimodalModel(model_config, rngs=nnx.Rngs(0)))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = nnx.state(abstract, nnx.Param)
    pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(abstract, params)
    with contextlib.redirect_stdout(None) if log is None else contextlib.nullcontext():
        info = init_from.load(abstract, workdir, log=log or (lambda *_: None))
    return abstract, int(info["step"])


def open_run(workdir: str, *, log=None) -> Run:
    """Config, tokenizer and the newest checkpoint of a training run, ready to generate on one device."""
    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is not a directory")
    cfg = load_config(workdir)
    tokenizer = load_tokenizer(workdir)
    model, step = restore_model(cfg.model, workdir, log=log)
    return Run(cfg, model, tokenizer, step, workdir)
