"""A frozen encoder's pre-projector features per sample on disk, so that later epochs skip the encoder.

``DataConfig.encoder_cache = DIR``. One entry per encoder instance (the item-th image or clip of a sample), in
``DIR/<modality>-<fingerprint>/<sample key>.npy``:

- **key**: the instance's stable id from the data stream, so every epoch and every resumed run finds it. Synthetic
  data (``SyntheticBatches.instance_keys``): split, seed, sample index, item. A real dataset
  (``datasets.Loader.last_instance_keys``): the sha256 of the media file's bytes, read once with the bytes that are
  decoded (``datasets.media.read_media``), so the key follows the content, not the record's index, id or path: a
  reordered or extended dataset still hits, an edited file is a miss;
- **fingerprint**: sha256 over the modality's encoder config, the preprocessing that makes its inputs (synthetic: the
  data config's fields that shape them and ``PREPROCESSING_VERSION`` of the renderer; real data: the source's
  ``preprocessing()``, the image mean / std and ``datasets.media.PREPROCESSING_VERSION``) and every byte of the
  encoder's weights. Another encoder, other weights or other preprocessing is another folder: nothing stale is read;
- **file**: the array in numpy's .npy format followed by the 32-byte sha256 of those .npy bytes, written to a
  temporary file in the same folder and renamed into place (``os.replace``: a reader sees the whole entry or none).
  An entry whose digest, shape or dtype does not match is counted as corrupt, deleted and recomputed, never used.

A native-resolution tower (packed patch rows ``{patches, grid, segment_ids}``) has one entry per instance (a segment
of a row), its per-patch features [n, D_enc], keyed by the sha256 of its packed patches and grid (``native_key``):
the content, since its row and offset change from batch to batch. Several processes: each host looks up, encodes and
stores the instances of its own rows (``FeatureCache.features(span=)``, ``FrozenEncoders`` on its own devices).

``FeatureCache.features(batch, keys, encode)`` turns a batch's ``encoder_inputs[name]`` of frozen modalities into
``encoder_features[name]`` (what ``MultimodalModel.embed`` projects and injects), encoding only the misses with
``encode(name, inputs) -> features`` (``FrozenEncoders``: a jitted forward of the encoder alone, on its own copy of
the frozen weights). The train step then holds no encoder at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile

import numpy as np

PREPROCESSING_VERSION = "synthetic-v1"  # bump when mllm_jax.data.synthetic renders inputs differently
_DIGEST = 32
_INPUT_FIELDS = ("seed", "audio_fmax")  # DataConfig fields that change what an instance's encoder input is


def weights_digest(params) -> str:
    """sha256 over a pytree of arrays: every leaf's path, dtype, shape and bytes, in sorted path order."""
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def synthetic_preprocessing(data_config) -> dict:
    """What decides the synthetic stream's encoder inputs besides the encoder config (for ``fingerprint``)."""
    return {"version": PREPROCESSING_VERSION, **{f: getattr(data_config, f) for f in _INPUT_FIELDS}}


def fingerprint(name: str, model_config, preprocessing, weights: str) -> str:
    """The cache folder's hash for modality ``name``: encoder config, preprocessing, weights digest.
    ``preprocessing``: a JSON-able dict (a real source's ``preprocessing()``) or the synthetic stream's DataConfig."""
    enc = model_config.encoders[name]
    prep = preprocessing if isinstance(preprocessing, dict) else synthetic_preprocessing(preprocessing)
    text = f"{name}|{type(enc).__name__}|{dataclasses.asdict(enc)}|{json.dumps(prep, sort_keys=True)}|{weights}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def encode_entry(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    body = buf.getvalue()
    return body + hashlib.sha256(body).digest()


def decode_entry(blob: bytes, shape: tuple, dtype) -> np.ndarray | None:
    """The entry's array, or None when its digest, shape or dtype is wrong (corrupt, truncated, foreign)."""
    if len(blob) <= _DIGEST:
        return None
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        return None
    try:
        a = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError:
        return None
    if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        return None
    return a


def native_key(patches: np.ndarray, grid: np.ndarray) -> str:
    """A native-resolution instance's cache key: the sha256 of its encoder input, its packed patches [n, K] and their
    (t, h, w) grid [n, 3] (dtype and shape included). Its packed position changes from batch to batch, its content
    does not: like a real dataset's media-file key, the key follows the content (the processor's output, so other
    preprocessing is another key), and the tower's features of an instance depend on nothing else (attention stays
    within its own segment)."""
    h = hashlib.sha256()
    for a in (patches, grid):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return f"native-{h.hexdigest()}"


def segment_runs(segment_ids_P: np.ndarray, *, what: str) -> list[tuple[int, slice]]:
    """(segment id, its patches) of one packed row, in row order; each segment must be one contiguous run."""
    seg = np.asarray(segment_ids_P)
    out = []
    for sid in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == sid)
        if idx[-1] - idx[0] + 1 != len(idx):
            raise ValueError(f"{what}: segment {int(sid)} is not one contiguous run of patches (patches "
                             f"{int(idx[0])}..{int(idx[-1])} hold {len(idx)} of it)")
        out.append((int(sid), slice(int(idx[0]), int(idx[-1]) + 1)))
    return out


class FeatureStore:
    """One modality's entries under ``directory`` (already including its fingerprint); [T, D] float arrays.
    ``shape`` (None, D): entries of any length T (a native-resolution instance's patches); ``load`` then takes it."""

    def __init__(self, directory: str, shape: tuple, dtype=np.float32):
        self.directory, self.shape, self.dtype = directory, tuple(shape), np.dtype(dtype)
        os.makedirs(directory, exist_ok=True)

    def path(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"cache key must be a plain file name; got {key!r}")
        return os.path.join(self.directory, f"{key}.npy")

    def expected(self, length: int | None = None) -> tuple:
        if self.shape[0] is None:
            if length is None:
                raise ValueError(f"entries of {self.directory} vary in length; give the entry's length")
            return (int(length),) + self.shape[1:]
        return self.shape

    def load(self, key: str, length: int | None = None) -> tuple[np.ndarray | None, bool]:
        """(array or None, whether an entry existed but was corrupt: then it is deleted). ``length``: the entry's
        first dimension when entries vary in length (a stored entry of another length is corrupt)."""
        shape = self.expected(length)
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None, False
        a = decode_entry(blob, shape, self.dtype)
        if a is None:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            return None, True
        return a, False

    def store(self, key: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        shape = self.expected(array.shape[0] if array.ndim else None)
        if array.shape != shape or array.dtype != self.dtype:
            raise ValueError(f"feature cache entry {key!r}: expected {shape} {self.dtype}, got {array.shape} "
                             f"{array.dtype}")
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_entry(array))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


class FeatureCache:
    """Stores per frozen modality (``stores[name]``) and the hit / miss / corrupt counts since creation.
    ``tokens_per_instance[name]``: ModelConfig.features_per_instance (the unit of feature_index); None for a
    native-resolution modality (packed patch rows: one entry per instance, its per-patch features [n, D_enc])."""

    def __init__(self, stores: dict, tokens_per_instance: dict):
        self.stores = stores
        self.tokens_per_instance = tokens_per_instance
        self.counts = {"hits": 0, "misses": 0, "corrupt": 0}

    def total_counts(self) -> dict:
        """Hits / misses / corrupt entries summed over every process (a collective with several processes: each
        calls it at the same point; one process: ``counts``)."""
        import jax

        if jax.process_count() == 1:
            return dict(self.counts)
        from jax.experimental import multihost_utils

        names = sorted(self.counts)
        got = np.asarray(multihost_utils.process_allgather(np.asarray([self.counts[n] for n in names], np.int64)))
        return {n: int(v) for n, v in zip(names, got.reshape(-1, len(names)).sum(0))}

    def features(self, batch: dict, keys: dict, encode, *, span: int = 0) -> dict:
        """The batch with ``encoder_inputs[name]`` replaced by ``encoder_features[name]`` for every cached modality.

        ``keys[name]``: object array shaped like the instance axes of encoder_inputs[name] ([M, N]), the id of each
        row; only rows that feature_index points at are looked up (unused rows get zero features). Misses are
        encoded together by ``encode(name, inputs [n, ...]) -> array [n, T, D]`` and stored. A native-resolution
        modality needs no keys: its packed rows' instances are keyed by content (``_native``).

        ``span``: which of the step's equal, contiguous spans of encoder rows this batch holds (several processes:
        a host's rows, ``distributed.host_local_slice``). feature_index is global within the microbatch, so this
        host's N rows are rows [span * N, (span + 1) * N) of it; a used row outside them is an error, never another
        row's features."""
        from mllm_jax.data.encoder_balance import used_slots

        inputs = dict(batch.get("encoder_inputs") or {})
        feats = dict(batch.get("encoder_features") or {})
        for name, store in self.stores.items():
            if name not in inputs:
                continue
            if self.tokens_per_instance[name] is None:
                feats[name] = self._native(name, store, inputs.pop(name), encode)
                continue
            x = np.asarray(inputs.pop(name))
            k = np.asarray(keys[name], object)
            if k.shape != x.shape[:k.ndim]:
                raise ValueError(f"instance keys for {name!r} have shape {k.shape}; encoder_inputs[{name!r}] has "
                                 f"instance axes {x.shape[:k.ndim]}")
            lead = x.shape[:k.ndim]
            x_MN = x.reshape((-1, k.shape[-1]) + x.shape[k.ndim:])
            k_MN = k.reshape(-1, k.shape[-1])
            fi = np.asarray(batch["feature_index"][name])
            fi_M = fi.reshape((-1,) + fi.shape[-2:])
            out = np.zeros(x_MN.shape[:2] + store.shape, store.dtype)
            missing = []
            start = span * x_MN.shape[1]
            for m in range(x_MN.shape[0]):
                used = used_slots(fi_M[m], self.tokens_per_instance[name], start + x_MN.shape[1],
                                  what=f"feature_index[{name!r}]")
                if len(used) and used[0] < start:
                    raise ValueError(f"feature_index[{name!r}] of microbatch {m} points at encoder row "
                                     f"{int(used[0])}, before this host's rows [{start}, {start + x_MN.shape[1]}) "
                                     f"(span={span})")
                for s in used - start:
                    if not k_MN[m, s]:
                        raise ValueError(f"encoder row {s} of microbatch {m} ({name!r}) is used by feature_index "
                                         f"but has no instance key ({k_MN[m, s]!r}): the data stream did not key it")
                    a, corrupt = store.load(k_MN[m, s])
                    self.counts["corrupt"] += int(corrupt)
                    if a is None:
                        missing.append((m, s))
                    else:
                        out[m, s] = a
                        self.counts["hits"] += 1
            if missing:
                got = np.asarray(encode(name, np.stack([x_MN[m, s] for m, s in missing])))
                for (m, s), a in zip(missing, got):
                    a = a.astype(store.dtype, copy=False)
                    store.store(k_MN[m, s], a)
                    out[m, s] = a
                self.counts["misses"] += len(missing)
            feats[name] = out.reshape(lead + out.shape[2:])
        result = {k: v for k, v in batch.items() if k != "encoder_inputs"}
        if inputs:
            result["encoder_inputs"] = inputs
        result["encoder_features"] = feats
        return result

    def _native(self, name: str, store: FeatureStore, x: dict, encode) -> np.ndarray:
        """A native-resolution modality's packed rows {patches, grid, segment_ids} ([.., R, P, ...]) -> per-patch
        pre-projector features [.., R, P, D_enc] (zeros at padding), what the tower gives on those rows. Each
        instance (a segment of a row) is one entry, keyed by its content (``native_key``); the rows holding a miss
        are encoded as they are (their instances keep their packing) and the misses stored."""
        x = {k: np.asarray(v) for k, v in x.items()}
        seg = x["segment_ids"]
        lead, (rows, width) = seg.shape[:-2], seg.shape[-2:]
        flat = {k: v.reshape((-1,) + v.shape[len(lead) + 1:]) for k, v in x.items()}  # [all microbatches' rows, P..]
        out = np.zeros((flat["segment_ids"].shape[0], width) + store.shape[1:], store.dtype)
        missing = []  # (row, patches, key)
        for r, seg_P in enumerate(flat["segment_ids"]):
            for sid, run in segment_runs(seg_P, what=f"encoder_inputs[{name!r}] row {r}"):
                key = native_key(flat["patches"][r, run], flat["grid"][r, run])
                a, corrupt = store.load(key, run.stop - run.start)
                self.counts["corrupt"] += int(corrupt)
                if a is None:
                    missing.append((r, run, key))
                else:
                    out[r, run] = a
                    self.counts["hits"] += 1
        if missing:
            need = sorted({r for r, _, _ in missing})
            got = np.asarray(encode(name, {k: v[need] for k, v in flat.items()}))
            at = {r: i for i, r in enumerate(need)}
            for r, run, key in missing:
                a = got[at[r], run].astype(store.dtype, copy=False)
                store.store(key, a)
                out[r, run] = a
            self.counts["misses"] += len(missing)
        return out.reshape(lead + (rows, width) + out.shape[2:])


class FrozenEncoders:
    """``encode(name, inputs [n, ...]) -> np.ndarray [n, T, D]``: the modality's encoder alone, jitted, spread over
    the mesh like in the model (its own rules), on its own device copy of the frozen weights (the train step donates
    the model's buffers). ``n`` is padded to a few static sizes (encoder_balance.capacity), so few shapes compile.

    Several processes: each host encodes its own misses, which differ from the other hosts' in number and content, so
    one global program cannot serve them (its shapes and its inputs must agree on every host). The encoder runs on
    this host's devices alone (``mesh.local_mesh``, the global mesh's sub-mesh of this process's devices, same axis
    names): the frozen weights are gathered once (a collective at construction) and laid out there by their own
    specs, and every call is a program of this process only (no collective, no waiting on other hosts)."""

    def __init__(self, model, mesh, parallel_config, names):
        import jax
        from flax import nnx

        self.parallel_config = parallel_config
        self.mesh = mesh if jax.process_count() == 1 else _local_mesh(mesh)
        self.rule_table = model.rule_table
        self.graphdefs, self.states = {}, {}
        for name in names:
            gdef, state = nnx.split(model.encoders[name])
            self.graphdefs[name] = gdef
            self.states[name] = _local_copy(state, self.mesh)
        self._fns = {}

    def _fn(self, name: str):
        if name not in self._fns:
            import jax
            from flax import nnx

            from mllm_jax import partitioning as part

            gdef = self.graphdefs[name]
            rules = dict(self.rule_table).get(f"encoders/{name}") if self.rule_table is not None else None

            def run(state, x):
                with part.rules_scope(rules):
                    return nnx.merge(gdef, state)(x)

            self._fns[name] = jax.jit(run)
        return self._fns[name]

    def shards(self, name: str) -> int:
        """Devices of ``self.mesh`` the instance axis splits over (the rule's axes; on several processes their local
        sizes)."""
        from mllm_jax.data import placement
        from mllm_jax.data.encoder_balance import encoder_shards

        spec = placement.encoder_spec(self.mesh, self.rule_table, name, (encoder_shards(self.parallel_config, name),),
                                      0)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def __call__(self, name: str, inputs) -> np.ndarray:
        """``inputs``: [n, ...] instances, or a native-resolution tower's packed rows {patches, grid, segment_ids}
        [n, P, ...] (padded with empty rows: segment 0, whose outputs are unused)."""
        import jax
        from jax.sharding import NamedSharding

        from mllm_jax.data import placement
        from mllm_jax.data.encoder_balance import capacity

        x = jax.tree.map(np.asarray, inputs)
        n = jax.tree.leaves(x)[0].shape[0]
        shards = self.shards(name)
        rows = shards * capacity(-(-n // shards))

        def put(a):  # padded with zero instances (rows) to the static size, spread by the encoder's rule
            a = np.concatenate([a, np.zeros((rows - n,) + a.shape[1:], a.dtype)]) if rows > n else a
            return jax.device_put(a, NamedSharding(self.mesh, placement.encoder_spec(self.mesh, self.rule_table, name,
                                                                                     a.shape, 0)))

        with jax.set_mesh(self.mesh):
            out = self._fn(name)(self.states[name], jax.tree.map(put, x))
        return np.asarray(out)[:n]


def _local_mesh(mesh):
    """This process's devices of ``mesh`` as a mesh with the same axis names (jax's Mesh.local_mesh)."""
    try:
        return mesh.local_mesh
    except ValueError as e:
        raise ValueError(f"DataConfig.encoder_cache with several processes encodes each host's misses on its own "
                         f"devices, which must form a contiguous block of the mesh {dict(mesh.shape)} (build it with "
                         f"jax.make_mesh: devices ordered by process); they do not ({e})") from None


def _local_copy(state, mesh):
    """A copy of ``state``'s arrays that this process owns alone: on ``mesh`` (one process: the global mesh, same
    shardings) or, when an array spans other processes' devices, its whole value gathered from them
    (``distributed.to_host``, a collective) and laid out on the local ``mesh`` by the array's own spec."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mllm_jax import distributed

    def one(a):
        if a.is_fully_addressable:
            return a.copy()
        spec = a.sharding.spec if isinstance(a.sharding, NamedSharding) else P()  # else: replicated
        return jax.device_put(distributed.to_host(a), NamedSharding(mesh, spec))

    return jax.tree.map(one, state)


def open_cache(directory: str, model_config, preprocessing, encoders: FrozenEncoders) -> FeatureCache:
    """A FeatureCache for every modality ``encoders`` runs, each in its fingerprinted folder under ``directory``
    (``preprocessing``: see ``fingerprint``)."""
    stores, tokens = {}, {}
    for name, state in encoders.states.items():
        enc = model_config.encoders[name]
        digest = weights_digest(state)
        folder = os.path.join(directory, f"{name}-{fingerprint(name, model_config, preprocessing, digest)}")
        if model_config.is_native_resolution(name):  # one entry per instance: its patches' features [n, D_enc]
            stores[name], tokens[name] = FeatureStore(folder, (None, enc.d_model), np.float32), None
        else:
            stores[name] = FeatureStore(folder, (enc.num_features, enc.d_model), np.float32)
            tokens[name] = model_config.features_per_instance(name)
    return FeatureCache(stores, tokens)
