"""Orbax checkpoints of a training run: the train state, the data-iterator state and what model they belong to.

Layout per step (an Orbax CheckpointManager under {workdir}/checkpoints, async and atomic, last K kept):
  state/  {"model": {"encoders": ..., "projectors": ..., "llm": ...}, "optimizer": {...}}: the model's attribute
          names stay in the paths; arrays are restored straight into the current mesh's shardings, so a checkpoint
          written on one device count restores on another.
  data/   the data iterator's state (JSON), so a resumed run sees exactly the batches it would have seen.
  meta/   the model config and every saved array's shape (JSON), checked before anything is restored.
  checksums.json  size and CRC-32 of every file above, written once the step is committed.

Integrity: a step is verified against its checksums before it is used (``newest_intact_step``) and its restored
arrays must be finite (``restore_newest``). A step that fails (a truncated or altered file, corrupt metadata, an
empty directory) is reported naming the step and the file, moved aside to ``checkpoints/<step>.corrupt`` (Orbax
ignores that name) and the next older step is tried. A step without checksums (killed between Orbax's commit and
the checksum write, or written by an older version) is accepted only if it restores and is finite.

Nothing poisoned is saved: the loop checks each step's loss, gradient norm and updated parameters before it saves,
so every kept step is finite and rotation (keep the last K) cannot delete the only finite one.

``WorkdirLock``: {workdir}/lock names the run that holds the workdir (host, pid); a second run is refused, a lock
whose process is gone (same host, dead pid) is taken over.

One process saves its arrays whole (``_single_process_array_saves``): Orbax's default replica-parallel save splits
every replicated array into one slice per replica, eager slices that compile one program per shape (144 for a tiny
training state on 8 CPU devices: 2-130 s before the first write). It pays only when several hosts share the
writing; with one process the same host writes every byte either way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import socket
import time
import zlib

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


CHECKSUMS = "checksums.json"


class CheckpointCorruptError(ValueError):
    """A saved step that cannot be used: names the step and the file (or item) that failed."""

    def __init__(self, step: int, file: str, reason: str):
        super().__init__(f"checkpoint step {step} is corrupt: {file}: {reason}")
        self.step, self.file, self.reason = step, file, reason


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(dirpath, n), step_dir) for n in names]
    return sorted(f for f in out if f != CHECKSUMS)


def write_checksums(step_dir: str) -> None:
    """{step_dir}/checksums.json: [size, crc32] of every file of a committed step (written atomically)."""
    table = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc32(os.path.join(step_dir, f))]
             for f in _files(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"algorithm": "crc32", "files": table}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step: int, step_dir: str) -> bool:
    """True: every file matches its checksum; False: the step has no checksums (unverified). A mismatch, a missing
    or truncated file, or an unreadable table is a CheckpointCorruptError naming the file."""
    if not os.path.isdir(step_dir):
        raise CheckpointCorruptError(step, step_dir, "the step directory is gone")
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as fh:
            table = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(step, path, f"unreadable checksum table ({e})") from None
    for rel, (size, crc) in sorted(table.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            raise CheckpointCorruptError(step, full, "file missing")
        got = os.path.getsize(full)
        if got != size:
            raise CheckpointCorruptError(step, full, f"{got} bytes, {size} when saved (truncated or altered)")
        if _crc32(full) != crc:
            raise CheckpointCorruptError(step, full, "contents differ from when it was saved (CRC-32 mismatch)")
    return True


class WorkdirLockedError(RuntimeError):
    pass


class WorkdirLock:
    """{workdir}/lock: {"host", "pid", "time"} of the run using the workdir. ``acquire`` creates it atomically (a
    complete file is linked into place), refuses while a live run holds it (or one on another host, whose liveness
    cannot be checked from here), and takes over a stale one (this host, pid no longer running)."""

    def __init__(self, workdir: str, *, log=print):
        self.path = os.path.join(os.path.abspath(workdir), "lock")
        self.log = log
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _read(self, path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale(self, holder) -> bool:
        if not isinstance(holder, dict) or holder.get("host") != self.me["host"]:
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == self.me["pid"]:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def acquire(self) -> "WorkdirLock":
        tmp = f"{self.path}.{self.me['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.me, "time": time.time()}, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                holder = self._read(self.path)
                if not self._stale(holder):
                    raise WorkdirLockedError(
                        f"workdir {os.path.dirname(self.path)} is in use by another run (lock file {self.path}: "
                        f"{holder if holder is not None else 'unreadable'}); this run is host {self.me['host']} pid "
                        f"{self.me['pid']}. Wait for it to finish, use another --workdir, or delete the lock file if "
                        f"that run is gone.")
                # Stale: move it away atomically, and make sure what was moved is the stale lock we read.
                aside = f"{self.path}.stale.{self.me['pid']}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = self._read(aside)
                if moved != holder:  # another run took it over meanwhile: put it back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    os.remove(aside)
                    continue
                os.remove(aside)
                self.log(f"taking over the stale lock of host {holder.get('host')} pid {holder.get('pid')} (no such "
                         f"process) in {os.path.dirname(self.path)}")
            raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it")
        finally:
            os.remove(tmp)

    def release(self) -> None:
        if self.held and self._read(self.path) is not None and self._read(self.path).get("pid") == self.me["pid"]:
            os.remove(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@functools.cache
def _single_process_array_saves() -> None:
    """With one process, save jax arrays without replica-parallel slicing (module docstring). Orbax's handler
    registry is per process, so this changes nothing for a multi-process run; registered once (Orbax logs every
    override)."""
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        _single_process_array_saves()
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every = every
        self._pending = None  # a step saved whose checksums are not written yet
        self._async = async_save
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

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _finish_pending(self) -> None:
        """Wait for the last save to commit, then record its checksums (main process)."""
        if self._pending is None:
            return
        self.manager.wait_until_finished()
        step, self._pending = self._pending, None
        if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
            write_checksums(self.step_dir(step))

    def save(self, step: int, state, data_state: dict, model_config) -> None:
        self._finish_pending()
        meta = {"model_config": config_to_json(model_config), "shapes": tree_shapes(state)}
        self._pending = step
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if not self._async:  # committed already
            self._finish_pending()

    # --- integrity and fallback ---------------------------------------------------------------------------------
    def _read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict) or "model_config" not in meta or "shapes" not in meta:
                raise ValueError(f"want a dict with 'model_config' and 'shapes'; got {str(meta)[:100]}")
            return meta
        except Exception as e:  # noqa: BLE001  (JSONDecodeError, KeyError, FileNotFoundError, ...: all one fault)
            raise CheckpointCorruptError(step, os.path.join(self.step_dir(step), "meta"),
                                         f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None

    def move_aside(self, step: int, error: Exception, log=print) -> None:
        """Report a broken step and rename it to <step>.corrupt (Orbax no longer sees it); the main process moves,
        every process forgets it."""
        log(f"WARNING: {error}; moving it aside and trying the next older checkpoint")
        if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
            target, n = f"{self.step_dir(step)}.corrupt", 1
            while os.path.exists(target):
                target, n = f"{self.step_dir(step)}.corrupt.{n}", n + 1
            shutil.move(self.step_dir(step), target)
            log(f"moved {self.step_dir(step)} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()

    def check_step(self, step: int) -> bool:
        """CheckpointCorruptError unless the step's files match their checksums and its metadata reads; returns
        whether checksums were there (False: unverified, to be confirmed by restoring it)."""
        verified = verify_checksums(step, self.step_dir(step))
        self._read_meta(step)
        return verified

    def newest_intact_step(self, log=print) -> int | None:
        """The newest step that passes ``check_step``; newer broken ones are reported and moved aside."""
        self.manager.reload()
        for step in sorted(self.all_steps(), reverse=True):
            try:
                self.check_step(step)
                return step
            except CheckpointCorruptError as e:
                self.move_aside(step, e, log)
        return None

    def restore_newest(self, step: int, abstract_state, log=print):
        """(step, state, data state) of the newest usable step at or below ``step``: restored, finite, and either
        verified by its checksums or restored without error. Broken steps are moved aside; None when none is left."""
        while step is not None:
            try:
                verified = self.check_step(step)
                try:
                    state, data = self.restore(step, abstract_state)
                except Exception as e:  # noqa: BLE001
                    if verified:  # the bytes are as saved: not corruption, a real error; say which step
                        raise RuntimeError(f"restoring checkpoint step {step} from {self.step_dir(step)} failed "
                                           f"although its files match their checksums: {e}") from e
                    raise CheckpointCorruptError(step, os.path.join(self.step_dir(step), "state"),
                                                 f"cannot be restored ({type(e).__name__}: "
                                                 f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
                bad = nonfinite_paths(state)
                if bad:
                    raise CheckpointCorruptError(step, os.path.join(self.step_dir(step), "state"),
                                                 f"holds non-finite values in {bad[:3]}")
                return step, state, data
            except CheckpointCorruptError as e:
                self.move_aside(step, e, log)
                older = [s for s in self.all_steps() if s < step]
                step = max(older) if older else None
        return None

    def check_compatible(self, step: int, abstract_state, model_config) -> None:
        """ValueError naming what differs between the checkpoint's model and this run's. With ``abstract_state``
        None only the model configs are compared (possible before anything is built)."""
        meta = self._read_meta(step)
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
        self._finish_pending()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._finish_pending()
        self.manager.close()


def nonfinite_paths(tree) -> list[str]:
    """Paths of floating-point arrays of ``tree`` holding a NaN or an infinity (one fused reduction per array)."""
    import jax.numpy as jnp

    leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return []
    flags = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in leaves])
    return [_path_str(p) for (p, _), ok in zip(leaves, jax.device_get(flags)) if not ok]


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
