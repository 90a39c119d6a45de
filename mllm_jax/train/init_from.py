"""Start a fresh run's parameters from an earlier run's checkpoint (TrainConfig.init_from / init_modules).

LLaVA stage 1 needs a pretrained encoder and LLM with a fresh projector: the selected parameters are read from the
source checkpoint's ``state/model`` subtree straight into this run's shardings (any device count), the rest keep
their fresh initialisation. Only parameters are taken: the optimizer, the data iterator and the step start fresh.
A resume of the run's own workdir always wins (see ``maybe_init``), so rerunning a command still resumes exactly.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mllm_jax.freeze import module_key
# The same path spelling as the checkpoint's meta/ shapes ("model/llm/embed/embedding").
from mllm_jax.train.checkpoint import Checkpointer, _path_str


def resolve_source(path: str) -> tuple[Checkpointer, int]:
    """``path``: a run's workdir (its newest checkpoint) or one step directory ``.../checkpoints/<step>``."""
    if not path or not os.path.isdir(path):
        raise ValueError(f"TrainConfig.init_from={path!r}: no such directory (expected a run's workdir or its "
                         f"checkpoints/<step> directory)")
    p = os.path.abspath(path)
    step = None
    if os.path.basename(p).isdigit() and os.path.basename(os.path.dirname(p)) == "checkpoints":
        workdir, step = os.path.dirname(os.path.dirname(p)), int(os.path.basename(p))
    else:
        workdir = p
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # checked first: Checkpointer would create it
        raise ValueError(f"TrainConfig.init_from={path!r} holds no checkpoints/ directory (expected a run's workdir "
                         f"or its checkpoints/<step> directory)")
    ckpt = Checkpointer(workdir, every=1, keep=1 << 30, async_save=False)  # read only: never saves, deletes nothing
    steps = ckpt.all_steps()
    if step is None:
        step = ckpt.latest_step()
    if step is None or step not in steps:
        ckpt.close()
        raise ValueError(f"TrainConfig.init_from={path!r} holds no complete checkpoint"
                         + (f" at step {step} (steps there: {sorted(steps)})" if step is not None else ""))
    return ckpt, step


def _normalise(modules) -> tuple[str, ...]:
    if isinstance(modules, str):  # gin's ("llm") is a string, not a tuple
        modules = (modules,)
    return tuple(m.strip("/") for m in modules)


def _matches(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def select(paths, modules) -> list[str]:
    """The parameter paths under any of ``modules`` (path prefixes; empty: all). A prefix matching nothing is an
    error naming it."""
    modules = _normalise(modules)
    if not modules:
        return list(paths)
    unmatched = [m for m in modules if not any(_matches(p, m) for p in paths)]
    if unmatched:
        tops = sorted({module_key(tuple(p.split("/"))) for p in paths})
        raise ValueError(f"TrainConfig.init_modules {unmatched} match no parameter of the model; prefixes of the "
                         f"parameter tree are e.g. {tops}")
    return [p for p in paths if any(_matches(p, m) for m in modules)]


def _check(selected: dict, ckpt: Checkpointer, step: int) -> None:
    """Every selected parameter must be in the source with the same shape and dtype."""
    shapes = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["shapes"]
    md = ckpt.manager.item_metadata(step)["state"]
    md = getattr(md, "tree", md)
    dtypes = {_path_str(p): x.dtype for p, x in
              jax.tree_util.tree_flatten_with_path(md, is_leaf=lambda x: hasattr(x, "shape"))[0]}
    wrong = []
    for path, x in selected.items():
        key = f"model/{path}"
        if key not in shapes:
            wrong.append(f"{path}: missing in the source")
        elif tuple(shapes[key]) != tuple(x.shape):
            wrong.append(f"{path}: source shape {tuple(shapes[key])} vs model {tuple(x.shape)}")
        elif key in dtypes and np.dtype(dtypes[key]) != np.dtype(x.dtype):
            wrong.append(f"{path}: source dtype {np.dtype(dtypes[key])} vs model {np.dtype(x.dtype)}")
    if wrong:
        more = f" (and {len(wrong) - 10} more)" if len(wrong) > 10 else ""
        raise ValueError(f"cannot initialise from step {step} in {ckpt.directory}: {len(wrong)} selected parameters "
                         f"do not match: " + "; ".join(wrong[:10]) + more)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for keys, v in flat.items():
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = v
    return out


def load(model, path: str, modules=(), *, log: Callable = print) -> dict:
    """Overwrite ``model``'s selected parameters with the source checkpoint's; returns what was loaded."""
    modules = _normalise(modules)
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    keys = {_path_str(p): tuple(k.key for k in p) for p, _ in leaves}
    arrays = {_path_str(p): x for p, x in leaves}
    ckpt, step = resolve_source(path)
    try:
        chosen = select(list(arrays), modules)
        _check({p: arrays[p] for p in chosen}, ckpt, step)
        # Only the selected arrays are read (partial restore), each straight into this run's sharding.
        target = {"model": _nest({keys[p]: jax.ShapeDtypeStruct(arrays[p].shape, arrays[p].dtype,
                                                                   sharding=arrays[p].sharding) for p in chosen})}
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(ckpt.directory, str(step), "state"),
            args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                        partial_restore=True))
    finally:
        ckpt.close()
    flat_restored = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored["model"])[0]}
    new_pure = jax.tree_util.tree_map_with_path(lambda p, x: flat_restored.get(_path_str(p), x), pure)
    nnx.replace_by_pure_dict(params, new_pure)
    nnx.update(model, params)
    n = int(sum(np.prod(arrays[p].shape) for p in chosen))
    fresh = sorted({module_key(keys[p]) for p in arrays if p not in set(chosen)})
    log(f"initialised {n:,} parameters ({', '.join(modules) or 'all'}) from {ckpt.directory} step {step}; "
        f"fresh: {', '.join(fresh) or 'none'}")
    return {"step": step, "directory": ckpt.directory, "loaded": chosen, "fresh_modules": fresh}


def maybe_init(model, cfg, *, resuming: bool, log: Callable = print) -> dict | None:
    """The loop's one call, right after the model is built and before the optimizer: load ``cfg.train.init_from``
    on a fresh start; on a resume the workdir's own checkpoint wins."""
    tc = cfg.train
    if tc.init_from and resuming:
        log(f"TrainConfig.init_from={tc.init_from!r} ignored: resuming from this workdir's own checkpoint")
        return None
    if tc.init_from:
        return load(model, tc.init_from, tc.init_modules, log=log)
    pretrained = cfg.pretrained is not None and not cfg.pretrained.empty
    if not pretrained and not cfg.model.is_trainable("llm"):
        log("warning: the LLM is frozen and randomly initialised, so it cannot learn; start it from a trained run "
            "with TrainConfig.init_from (and TrainConfig.init_modules)")
    return None
