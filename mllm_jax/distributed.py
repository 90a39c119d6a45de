"""Multi-host runs: start JAX's distributed runtime, give each host its share of a batch, build global arrays.

One process per host (a GPU node, a TPU VM worker, or a localhost process with fake CPU devices). Every process runs
the same program on the same global mesh; each one loads only the batch rows that land on its own devices and
``global_batch`` stitches the per-process pieces into one global ``jax.Array`` without moving data between hosts.

The order of calls in a training entry point:

    initialize(coordinator_address, num_processes, process_id, cpu_devices=n)   # before anything touches jax
    mesh = parallel.mesh.make_mesh(parallel_config)
    rows = host_local_slice(global_rows, mesh)                                   # this host's rows of every batch
    batch = global_batch(host_rows_of_the_batch, mesh, P(None, ("data", "fsdp")))
    if is_main_process(): write metrics

On CPU the cross-process collectives use gloo. Orbax (mllm_jax.train.checkpoint) needs nothing more: once the
distributed runtime is up, each process writes the shards it owns (a replicated shard once) into the shared workdir.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from typing import Mapping

import numpy as np

# Environment variables by which a cluster launcher announces a multi-process job. JAX's own detection
# (jax._src.clusters) reads the same ones; we check them first so that a plain `python train.py` on a laptop never
# waits for a coordinator.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")
_OMPI_SIZE = "OMPI_COMM_WORLD_SIZE"
_TPU_VARS = ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID")
BATCH_AXES = ("data", "fsdp", "expert")  # parallel.sharding.LLM_RULES["batch"]


def detect_cluster(environ: Mapping[str, str] | None = None, *, tpu_vm: bool | None = None) -> str | None:
    """'slurm', 'openmpi' or 'tpu' when a launcher started this process as one of several (or on a TPU VM, whose
    worker count JAX reads from the metadata server); None for a plain single-process run.

    A SLURM or Open MPI job of one task counts as single-process: there is nobody to coordinate with. ``tpu_vm``
    None -> look for TPU chips (/dev/accel*, /dev/vfio/*) with libtpu installed.
    """
    env = os.environ if environ is None else environ
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if _OMPI_SIZE in env and int(env[_OMPI_SIZE]) > 1:
        return "openmpi"
    if any(v in env for v in _TPU_VARS):
        return "tpu"
    if tpu_vm is None:
        tpu_vm = _on_tpu_vm()
    return "tpu" if tpu_vm else None


def _on_tpu_vm() -> bool:
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def without_cpu_device_count(xla_flags: str) -> str:
    """``xla_flags`` less its fake CPU device count (every other flag kept)."""
    return re.sub(r"--xla_force_host_platform_device_count=\d+", "", xla_flags).strip()


def set_cpu_device_count(n: int) -> None:
    """The number of (fake) CPU devices of this process, which then runs on the CPU backend (JAX_PLATFORMS=cpu
    unless set: no TPU / CUDA backend is probed, with its warnings, beside the devices asked for). XLA reads both
    once, when jax starts its backends."""
    if n < 1:
        raise ValueError(f"cpu_devices must be >= 1; got {n}")
    flags = without_cpu_device_count(os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    use_cpu_backend()
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_num_cpu_devices", n)


def use_cpu_backend() -> None:
    """Run this process on jax's CPU backend unless JAX_PLATFORMS says otherwise: no TPU / CUDA backend is probed
    (with the warnings of a plugin that finds no device). Before jax starts its backends; jax may be imported
    already (it reads JAX_PLATFORMS at import: its config is set too)."""
    if os.environ.get("JAX_PLATFORMS"):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        import jax

        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")


def _check_coordinator_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address must be HOST:PORT (e.g. 10.0.0.1:1234); got {address!r}")


DEFAULT_TIMEOUT_S = 300  # jax.distributed.initialize's own default


def _wait_for_coordinator(address: str, timeout: int, who: str, *, report_every_s: float = 30.0) -> int:
    """Until process 0's coordinator accepts TCP connections at ``address``; returns the seconds left of
    ``timeout`` (at least 1). RuntimeError naming the address and this process when it never does."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    start = last_report = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - start)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(2.0, left))):
                return max(1, int(left))
        except OSError as e:
            error = e
        now = time.monotonic()
        if now - start >= timeout:
            raise RuntimeError(
                f"distributed start-up failed: {who} waited {timeout} s for the coordinator at {address}, which "
                f"never accepted a connection ({type(error).__name__}: {error}). Check that process 0 runs and that "
                f"--coordinator_address is its reachable HOST:PORT; raise the timeout if processes start slowly.")
        if now - last_report >= report_every_s:
            print(f"{who}: still waiting for the coordinator at {address} ({int(now - start)} s of {timeout} s)",
                  file=sys.stderr, flush=True)
            last_report = now
        time.sleep(min(0.5, max(0.0, timeout - (now - start))))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_devices: int | None = None,
               environ: Mapping[str, str] | None = None, timeout_s: int | None = None) -> str | None:
    """Starts JAX's distributed runtime when this is one process of several; call it before any other jax call.

    - Any of the three arguments given (or JAX_COORDINATOR_ADDRESS set): jax.distributed.initialize with them; JAX
      fills a missing one from the cluster environment or raises.
    - None given: jax.distributed.initialize() with auto-detection, but only when ``detect_cluster`` finds a
      SLURM (srun), Open MPI (mpirun) or Cloud TPU job; otherwise nothing happens (a single-process run).
    ``cpu_devices`` sets this process's number of CPU devices first (development and tests on CPU).
    ``timeout_s`` (default 300): how long to wait for the coordinator and the other processes. Before waiting it
    prints (stderr) which process it is and which coordinator address it waits for; when the wait fails it raises a
    RuntimeError saying the same, instead of JAX's bare error.

    Returns how the runtime was started: "flags", "slurm", "openmpi", "tpu", or None (single process).
    """
    env = os.environ if environ is None else environ
    if cpu_devices is not None:
        set_cpu_device_count(cpu_devices)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1; got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}); got {process_id}")
    if coordinator_address is not None:
        _check_coordinator_address(coordinator_address)
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None) or bool(
        env.get("JAX_COORDINATOR_ADDRESS"))
    how = "flags" if explicit else detect_cluster(env)
    if how is None:
        return None

    import jax

    # gloo: the cross-process collectives of the CPU backend (a no-op setting on GPU and TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    if timeout < 1:
        raise ValueError(f"the distributed start-up timeout must be >= 1 s; got {timeout_s}")
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or f"<detected from the {how} environment>"
    who = (f"process {process_id if process_id is not None else '?'} of "
           f"{num_processes if num_processes is not None else '?'}")
    role = "serving as the coordinator at" if process_id == 0 else "waiting for the coordinator at"
    print(f"distributed start-up ({how}): {who}, {role} {address}, for up to {timeout} s", file=sys.stderr,
          flush=True)
    if coordinator_address is not None and process_id not in (None, 0):
        # JAX aborts the process with a C++ stack dump when the coordinator never answers: wait for its port here
        # first, so a wrong address or a coordinator that is not up is a plain error naming both.
        timeout = _wait_for_coordinator(coordinator_address, timeout, who)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError, ValueError, ...: one message saying what was awaited)
        first = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"distributed start-up failed: {who} could not join the job at coordinator {address} within {timeout} "
            f"s. Check that process 0 runs, that --coordinator_address is process 0's reachable HOST:PORT, and "
            f"--num_processes; raise the timeout if processes start slowly. ({type(e).__name__}: {first})") from None
    return how


def is_main_process() -> bool:
    """True on the process that writes logs, metrics and other once-per-job files (process 0)."""
    import jax

    return jax.process_index() == 0


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def _local_blocks(sharding, shards: tuple[int, ...]) -> list[list[int]]:
    """Per array dimension, the block indices (0..shards[d]-1) that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(shards)
    blocks = [set() for _ in shards]
    for index in index_map.values():
        for d, s in enumerate(index):
            blocks[d].add(0 if s.start is None else s.start)
    return [sorted(b) for b in blocks]


def host_local_slice(global_batch_rows: int, mesh, batch_axes=BATCH_AXES) -> slice:
    """The rows of a [global_batch_rows, ...] batch, sharded over ``batch_axes`` of ``mesh``, that live on this
    process's devices: the only rows this host has to load. Contiguous for meshes made by jax.make_mesh (devices
    ordered by process); a mesh that interleaves processes along the batch axes is refused."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    batch_axes = tuple(a for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes)
                       if a in mesh.axis_names)  # a mesh without an `expert` axis: its other batch axes
    shards = _axes_size(mesh, batch_axes)
    if global_batch_rows % shards:
        raise ValueError(f"global_batch_rows={global_batch_rows} is not divisible by the {shards} shards of mesh "
                         f"axes {batch_axes} ({ {a: mesh.shape[a] for a in batch_axes} })")
    blocks = _local_blocks(NamedSharding(mesh, P(batch_axes)), (shards,))[0]
    if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise ValueError(f"this process holds batch blocks {blocks} of {shards}, which are not contiguous: build the "
                         f"mesh with jax.make_mesh (devices ordered by process) so each host loads one slice")
    per_block = global_batch_rows // shards
    return slice(blocks[0] * per_block, (blocks[-1] + 1) * per_block)


def take_host_rows(batch_tree, mesh, axis: int = 0, batch_axes=BATCH_AXES):
    """This process's rows (``host_local_slice``) of every leaf of a batch that every host holds in full. One process
    holds every row: the tree as it is (rows need not divide over the shards then: a native tower's patch rows, which
    placement lays out by what divides them)."""
    import jax

    if jax.process_count() == 1:
        return batch_tree
    return jax.tree.map(lambda x: x[(slice(None),) * axis + (host_local_slice(x.shape[axis], mesh, batch_axes),)],
                        batch_tree)


def _spec_for(spec, ndim: int):
    from jax.sharding import PartitionSpec as P

    spec = tuple(spec)
    if len(spec) > ndim:
        raise ValueError(f"PartitionSpec {P(*spec)} has {len(spec)} entries for an array of rank {ndim}")
    return P(*(spec + (None,) * (ndim - len(spec))))


def global_batch(local_batch_tree, mesh, specs):
    """Global jax.Arrays from each process's rows of a batch (jax.make_array_from_process_local_data).

    ``specs``: one PartitionSpec for every leaf (entries beyond it are None: replicated) or a pytree of them matching
    ``local_batch_tree``. Along a sharded dimension each process passes the blocks its devices hold (for the batch
    axis: the rows of ``host_local_slice``); along a replicated one, the whole dimension. Single process: the local
    tree is the global batch and this is a sharded device_put.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    def one(spec, x):
        x = np.asarray(x)
        spec = _spec_for(spec, x.ndim)
        sharding = NamedSharding(mesh, spec)
        shards = tuple(_axes_size(mesh, a) for a in spec)
        blocks = _local_blocks(sharding, shards)
        global_shape = []
        for d, (n, held) in enumerate(zip(shards, blocks)):
            if x.shape[d] % len(held):
                raise ValueError(f"local array of shape {x.shape}: dimension {d} ({x.shape[d]}) does not split into "
                                 f"the {len(held)} blocks this process holds under {spec}")
            global_shape.append(x.shape[d] // len(held) * n)
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    if isinstance(specs, P):
        return jax.tree.map(lambda x: one(specs, x), local_batch_tree)
    return jax.tree.map(one, specs, local_batch_tree, is_leaf=lambda s: isinstance(s, P))


def to_host(tree):
    """numpy copies of (possibly multi-host) jax.Arrays: every process gets the whole global value. Collective when
    an array spans other processes' devices, so every process must call it."""
    import jax
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
