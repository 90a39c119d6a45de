"""A deterministic, host-sharded, checkpointable loader with background prefetch.

Every host plans every global batch the same way from cheap metadata (``source.prepare``: tokens, instance counts;
no media decoded): the epoch permutation from (seed, epoch), the next ``global_batch_samples`` good samples, their
workloads, the rank x microbatch assignment, the packing and the bucket shape. Then each host decodes only the
samples of its own data ranks and writes its block of the batch (``PackedBatchWriter``). So hosts agree on shapes
and feature indices without talking to each other, and the state to resume is tiny: {epoch, position, seed, ...}.

Why not Grain: the balanced assignment needs a view of the whole global batch before any host decodes its share;
Grain shards records per host first and maps/batches after, which does not express that. Its prefetch and
checkpointing are simple to provide here (one thread + a queue; the state is the position in the permutation).

Bad samples found while planning (malformed record, placeholder/file count mismatch, over-long, missing file) are
seen, counted and logged identically by every host; a file that exists but cannot be decoded is found only by the
host that decodes it, which leaves that sample's slot as padding and counts it.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass

import numpy as np

from mllm_jax.data import native_pack
from mllm_jax.data.datasets.balance import Capacity, assign
from mllm_jax.data.datasets.config import DatasetConfig
from mllm_jax.data.datasets.packing import PackedBatchWriter, choose_bucket, pack_rows
from mllm_jax.data.datasets.sample import BadSampleError, BadSampleLog
from mllm_jax.data.datasets.workload import WorkloadModel


@dataclass
class BatchPlan:
    """One global batch, planned identically on every host."""

    samples: list  # PreparedSample, global batch order
    assignment: list  # [rank][microbatch] -> indices into samples
    rows: list  # [rank][microbatch] -> per row, indices into samples
    seq_len: int
    slots: dict  # modality -> encoder slots per microbatch
    end_state: dict  # loader state after this batch


def local_data_ranks(num_data_ranks: int, process_index: int, process_count: int) -> range:
    """Data ranks a host feeds, assuming the data axes are outermost and devices ordered by process (what
    jax.make_mesh gives on multi-host slices). Hosts sharing one rank all produce its data."""
    d, p, i = num_data_ranks, process_count, process_index
    if not 0 <= i < p:
        raise ValueError(f"process_index must be in [0, {p}); got {i}")
    if d % p == 0:
        k = d // p
        return range(i * k, (i + 1) * k)
    if p % d == 0:
        r = i // (p // d)
        return range(r, r + 1)
    raise ValueError(f"num_data_ranks ({d}) and process_count ({p}): one must divide the other")


class Loader:
    """Iterator of host batches [M, D_local * R, S] (see PackedBatchWriter) over a source
    (mllm_jax.data.datasets.sources).

    ``state()`` is the JSON-able state after the last batch returned; ``Loader(..., state=s)`` continues exactly
    there. ``bad_sample_counts`` are the skipped samples by reason (for the metrics). ``last_sample_ids`` and
    ``last_instance_keys`` describe the batch returned last: the latter, per modality, the stable id of each encoder
    row (the sha256 of its media file; "" for empty slots), what a frozen encoder's feature cache keys by."""

    def __init__(self, source, config: DatasetConfig, model_config, *, num_data_ranks: int = 1, microbatches: int = 1,
                 process_index: int | None = None, process_count: int | None = None, local_ranks=None,
                 state: dict | None = None, pad_id: int = 0, workload_model: WorkloadModel | None = None):
        self.config = config.validate()
        self.source = source
        if len(source) == 0:
            raise ValueError(f"dataset {config.path!r} has no records")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        self.num_ranks, self.microbatches = int(num_data_ranks), int(microbatches)
        self.local_ranks = range(*local_ranks) if isinstance(local_ranks, tuple) else (
            local_ranks or local_data_ranks(self.num_ranks, process_index, process_count))
        if config.global_batch_samples < self.num_ranks * self.microbatches:
            raise ValueError(f"DatasetConfig.global_batch_samples ({config.global_batch_samples}) is fewer than "
                             f"data ranks x microbatches ({self.num_ranks} x {self.microbatches})")
        self.pad_id = pad_id
        self.workload_model = workload_model or WorkloadModel(model_config)
        self.placeholder_ids = {n: model_config.placeholder_ids[n] for n in source.modalities}
        # Native-resolution modalities (docs/native_resolution.md): instances packed into patch rows, whose count per
        # rank and microbatch is the smallest of DatasetConfig.instance_buckets that holds every microbatch's.
        self.native = {n: model_config.encoders[n] for n in source.modalities if model_config.is_native_resolution(n)}
        merges = [e.spatial_merge_size for e in self.native.values()]
        self.mrope_merge = (merges[0] if merges else 1) if getattr(model_config.llm, "mrope_section", None) else None
        state = dict(state) if state is not None else {"epoch": 0, "position": 0}
        self._check_state(state)
        self.bad = BadSampleLog(config.on_bad_sample, state.get("bad_samples"))
        self._state = self._public_state(state["epoch"], state["position"], self.bad.counts)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.num_workers)
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch)
        self._stop = threading.Event()
        self.last_sample_ids = None
        self.last_instance_keys = None  # {modality: object [M, D_local * N]} of the last batch (PackedBatchWriter)
        self._thread = threading.Thread(target=self._produce, args=(dict(self._state),), daemon=True)
        self._thread.start()

    # --- state -------------------------------------------------------------------------------------------------
    def _public_state(self, epoch, position, counts) -> dict:
        return {"epoch": int(epoch), "position": int(position), "seed": int(self.config.seed),
                "num_records": len(self.source), "bad_samples": dict(counts)}

    def _check_state(self, state):
        for key, want in (("seed", self.config.seed), ("num_records", len(self.source))):
            if key in state and int(state[key]) != int(want):
                raise ValueError(f"loader state {key}={state[key]} does not match this dataset's {key}={want}")
        if int(state.get("epoch", 0)) < 0 or not 0 <= int(state.get("position", 0)) <= len(self.source):
            raise ValueError(f"loader state has epoch/position out of range: {state}")

    def state(self) -> dict:
        return dict(self._state, bad_samples=dict(self._state["bad_samples"]))

    @property
    def bad_sample_counts(self) -> dict:
        return dict(self._state["bad_samples"])

    # --- planning (identical on every host) -------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        if not self.config.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.config.seed, epoch]).permutation(n)

    def plan(self, state: dict) -> BatchPlan:
        cfg = self.config
        epoch, pos = state["epoch"], state["position"]
        start = (epoch, pos)
        order = self.epoch_order(epoch)
        samples, bad_in_a_row = [], 0
        while len(samples) < cfg.global_batch_samples:
            if pos >= len(order):  # a global batch may span the end of an epoch: no sample is dropped
                epoch, pos = epoch + 1, 0
                order = self.epoch_order(epoch)
            idx = int(order[pos])
            pos += 1
            try:
                samples.append(self.source.prepare(idx))
                bad_in_a_row = 0
            except BadSampleError as e:
                self.bad.report(e)
                bad_in_a_row += 1
                if bad_in_a_row >= len(order):
                    raise ValueError(f"every record of {cfg.path!r} is bad; skipped so far: {self.bad.counts}")
        tokens = [s.num_tokens for s in samples]
        mods = self.source.modalities
        inst = [{m: s.num_instances(m) for m in mods} for s in samples]
        # A native modality is priced from its instances' grids and limited by patches: each sample's instances'
        # patch counts (known from the headers), which must first-fit into n_max patch rows per microbatch.
        grids = [{m: [i.grid for i in s.instances if i.modality == m] for m in self.native} for s in samples]
        patches = [{m: [int(np.prod(g)) for g in d[m]] for m in self.native} for d in grids]
        work = self.workload_model.workloads(tokens, [dict(d, **g) for d, g in zip(inst, grids)])
        rows, s_max, n_max = cfg.rows_per_microbatch, max(cfg.seq_len_buckets), max(cfg.instance_buckets)

        def native_rows(ix, m):
            return native_pack.rows_needed([n for i in ix for n in patches[i][m]], self.native[m])

        def fits(ix):
            return pack_rows([tokens[i] for i in ix], rows, s_max) is not None and all(
                native_rows(ix, m) <= n_max for m in self.native)

        cap = Capacity(tokens, [[sum(patches[i][m]) if m in self.native else inst[i][m] for m in mods]
                                for i in range(len(samples))], max_tokens=rows * s_max,
                       max_instances=[n_max * self.native[m].patches_per_row if m in self.native else n_max
                                      for m in mods], fits=fits)
        assignment = assign(work, num_ranks=self.num_ranks, num_microbatches=self.microbatches,
                            method=cfg.microbatch_assignment, seed=[cfg.seed, *start], capacity=cap,
                            refine_iterations=cfg.refine_iterations)
        mbs = [mb for rank in assignment for mb in rank]

        def packs(s):
            return all(pack_rows([tokens[i] for i in mb], rows, s) is not None for mb in mbs)

        seq_len = choose_bucket(cfg.seq_len_buckets, packs)
        need = {m: max(native_rows(mb, m) if m in self.native else sum(inst[i][m] for i in mb) for mb in mbs)
                for m in mods}
        slots = {m: choose_bucket(cfg.instance_buckets, lambda b, m=m: b >= need[m]) for m in mods}
        plan_rows = [[[[mb[j] for j in row] for row in pack_rows([tokens[i] for i in mb], rows, seq_len)]
                      for mb in rank] for rank in assignment]
        return BatchPlan(samples, assignment, plan_rows, seq_len, slots,
                         self._public_state(epoch, pos, self.bad.counts))

    # --- this host's share -------------------------------------------------------------------------------------
    def _materialize(self, prepared):
        try:
            return self.source.materialize(prepared)
        except BadSampleError as e:
            self.bad.report(e)
            return None

    def build(self, plan: BatchPlan):
        mine = sorted({i for r in self.local_ranks for mb in plan.assignment[r] for i in mb})
        decoded = dict(zip(mine, self._pool.map(self._materialize, [plan.samples[i] for i in mine])))
        writer = PackedBatchWriter(microbatches=self.microbatches, local_ranks=len(self.local_ranks),
                                   first_rank=self.local_ranks[0], rows=self.config.rows_per_microbatch,
                                   seq_len=plan.seq_len, slots=plan.slots, shapes=self.source.instance_shapes,
                                   feature_counts=self.source.feature_counts, placeholder_ids=self.placeholder_ids,
                                   pad_id=self.pad_id, native=self.native, mrope_merge=self.mrope_merge)
        ids = [[None] * len(self.local_ranks) for _ in range(self.microbatches)]
        for lr, r in enumerate(self.local_ranks):
            for m in range(self.microbatches):
                writer.put(m, lr, [[decoded[i] for i in row] for row in plan.rows[r][m]],
                           dropped=[plan.samples[i] for row in plan.rows[r][m] for i in row if decoded[i] is None])
                ids[m][lr] = [decoded[i].sample_id for row in plan.rows[r][m] for i in row if decoded[i] is not None]
        return writer.batch, ids, writer.instance_keys

    # --- prefetch thread ---------------------------------------------------------------------------------------
    def _produce(self, state):
        try:
            while not self._stop.is_set():
                plan = self.plan(state)
                batch, ids, keys = self.build(plan)
                end = dict(plan.end_state, bad_samples=self.bad.counts)
                self._put(("batch", batch, (ids, keys), end))
                state = end
        except BaseException as e:  # surfaced to the consumer by __next__
            self._put(("error", e, None, None))

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._stop.is_set():
            raise StopIteration
        kind, payload, ids, end = self._queue.get()
        if kind == "error":
            self.close()
            raise payload
        self._state, (self.last_sample_ids, self.last_instance_keys) = end, ids
        return payload

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
