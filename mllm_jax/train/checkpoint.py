"""Orbax checkpoints of a training run: the train state, the data-iterator state and what model they belong to.

Layout per step (an Orbax CheckpointManager under {workdir}/checkpoints, async and atomic, last K kept):
  state/  {"model": {"encoders": ..., "projectors": ..., "llm": ...}, "optimizer": {...}}: the model's attribute
          names stay in the paths; arrays are restored straight into the current mesh's shardings, so a checkpoint
          written on one device count restores on another.
  data/   the data iterator's state (JSON), so a resumed run sees exactly the batches it would have seen.
  meta/   the model config and every saved array's shape (JSON), checked before anything is restored.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def config_to_json(cfg) -> dict:
    """A dataclass config as plain JSON (dicts with string keys, lists for tuples)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_shapes(tree) -> dict:
    return {_path_str(p): list(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_shapes_paths(tree) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return [_path_str(p) for p, _ in leaves]


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the loop decides when; force saves (SIGTERM, the end) must not be skipped
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, model_config) -> None:
        meta = {"model_config": config_to_json(model_config), "shapes": tree_shapes(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def check_compatible(self, step: int, abstract_state, model_config) -> None:
        """ValueError naming what differs between the checkpoint's model and this run's. With ``abstract_state``
        None only the model configs are compared (possible before anything is built)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_cfg, cfg = meta["model_config"], config_to_json(model_config)
        diffs = _diff(saved_cfg, cfg)
        saved_shapes = meta["shapes"]
        shapes = saved_shapes if abstract_state is None else tree_shapes(abstract_state)
        missing = sorted(set(shapes) - set(saved_shapes))[:5]
        extra = sorted(set(saved_shapes) - set(shapes))[:5]
        wrong = [f"{k}: checkpoint {saved_shapes[k]} vs model {shapes[k]}" for k in sorted(set(shapes) & set(saved_shapes))
                 if saved_shapes[k] != shapes[k]][:5]
        if diffs or missing or extra or wrong:
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} belongs to an incompatible model: "
                + "; ".join(filter(None, [
                    f"model config differs: {diffs}" if diffs else "",
                    f"arrays missing from the checkpoint: {missing}" if missing else "",
                    f"arrays only in the checkpoint: {extra}" if extra else "",
                    f"shape mismatches: {wrong}" if wrong else "",
                ]))
                + ". Use another --workdir or the recipe that wrote it."
            )

    def saved_paths(self, step: int) -> list[str]:
        """The array paths stored in the step's state tree, as Orbax recorded them ("model/llm/...")."""
        meta = self.manager.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        return sorted(tree_shapes_paths(tree))

    def restore(self, step: int, abstract_state):
        """Restore into ``abstract_state`` (ShapeDtypeStructs carrying this run's shardings)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _diff(a, b, prefix="") -> list[str]:
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{prefix}{k}: checkpoint {a.get(k, '<absent>')!r} vs now {b.get(k, '<absent>')!r}")
            else:
                out += _diff(a[k], b[k], f"{prefix}{k}.")
    elif a != b:
        out.append(f"{prefix.rstrip('.')}: checkpoint {a!r} vs now {b!r}")
    return out
