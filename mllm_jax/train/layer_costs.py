"""Per-layer op costs of the real model, compiled for a target: the table the pipeline planner plans on when it is
given one (``parallel.pipeline_plan.plan_pipeline(layer_costs=...)``; without one it uses the analytic costs).

For a ModelConfig and one microbatch's shapes (``costs.pipeline_costs``' arguments) one layer of each kind is
compiled: the LLM's decoder layer as the pipelined step runs it (``LLM.stage_layer``), its loss head
(``llm.head_loss``), each encoder's stem and one of its transformer layers, each projector. Each in the ops the
pipeline runtime runs (``parallel.pipeline.layer_grads``: remat per layer, so every backward recomputes the forward):

  f   the forward;
  b   the forward, then the vjp with respect to the layer's input only (weights are constants);
  w   the forward, then the vjp with respect to the trainable weights only (LoRA: the adapters; a layer without
      trainable weights compiles to nothing: 0 FLOPs);
  bw  the forward, then both in one vjp (the fused backward).

An op's compiled ``cost_analysis`` FLOPs and bytes accessed give its roofline time max(FLOPs / peak, bytes / HBM
bandwidth) on the target's chip (``targets.CHIPS``). The planner's unit is FLOPs; a compiled op is entered as its
roofline time x peak ("FLOPs at peak": a memory-bound op costs more than its FLOPs), so ``plan_pipeline(...,
device_flops=peak)`` reports roofline seconds. On "cpu" (no chip figures) the unit is the compiled FLOPs.

Which ops are compiled: those the frozen rule runs for the layer at its position (f always; b where something
upstream trains; w where the layer has trainable weights; bw where both), or every op (``ops="all"``). Identical
layers compile once: every decoder layer of the LLM is one kind, every transformer layer of an encoder one kind
(cache key: the layer's config, shapes, trainability, op, target). Not compiled: the embedding lookup (a gather,
priced 0 as in the analytic model). A vision stem whose token count is not its config's (``encoder_tokens``) is
compiled at the nearest square grid and scaled by the token ratio (a per-patch matmul and add). The loss head is
compiled as one chunk (``cost_analysis`` counts a scan's body once); with several chunks the runtime's loss
recomputes each chunk's logits in its backward (remat), added as one more forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax import layers as L
from mllm_jax import lora as lora_lib
from mllm_jax.config import AudioConfig, ModelConfig, VisionConfig
from mllm_jax.costs import modality_shapes, pipeline_costs
from mllm_jax.encoder import EncoderLayers, apply_encoder_layers
from mllm_jax.llm import LLM, head_loss
from mllm_jax.loss import chunk_length
from mllm_jax.multimodal import build_encoder
from mllm_jax.parallel.pipeline import ParamSplit, layer_grads
from mllm_jax.parallel.pipeline_plan import OPS, LayerCosts
from mllm_jax.projector import Projector
from mllm_jax.train.compile_target import _cost, compile_on_target
from mllm_jax.train.pipelined_step import _stage_layer, llm_base_trainable, llm_layers_trainable
from mllm_jax.train.targets import Target, gives_costs

_CACHE: dict = {}  # (kind key, op, target) -> {"flops", "bytes", "seconds", "cost"}
_DISK: dict = {"path": None, "figures": {}}  # an optional JSON file of the figures by str(key): resumable runs


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One layer as a pure function ``fn(p, x, aux) -> y`` of abstract parameters ``p`` (``mask``: which leaves
    train), input ``x`` and side inputs ``aux``; ``key`` identifies it for the cache; ``scale`` multiplies its
    compiled figures (a stem compiled at another token count)."""

    key: tuple
    fn: object
    p: object
    mask: object
    x: object
    aux: object
    scale: float = 1.0


def _compute_dtype(config: ModelConfig):
    return L.dtype_of(config.dtype)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype)


def _mask(state, trainable: bool, lora_only: bool, keep=lambda path: True):
    """Per leaf: trains? (the whole module, or with LoRA its adapters only; ``keep(path)`` False: never)."""
    def leaf(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if not keep(names):
            return False
        if lora_only:
            return any(n in ("lora_a", "lora_b") for n in names)
        return trainable
    return jax.tree_util.tree_map_with_path(leaf, state)


def _module_piece(key, module, call, x, aux, *, trainable: bool, lora_only: bool, keep=lambda path: True,
                  scale=1.0) -> _Piece:
    """A piece from an abstract nnx module and ``call(module, x, aux)``."""
    gdef, state = nnx.split(module)

    def fn(p, h, a):
        return call(nnx.merge(gdef, p), h, a)

    return _Piece(key, fn, state, _mask(state, trainable, lora_only, keep), x, aux, scale)


# ----------------------------------------------------------------------------------------------------------------
# The pieces of a model.


def _run(config: ModelConfig, attention_impl: str, lora_scale: float = 0.0):
    # One layer, no scan and no remat wrapper: the op's own vjp is the remat (as in the pipeline runtime).
    return dataclasses.replace(config.run_settings(lora_scale=lora_scale), remat="none", layer_loop="unrolled",
                               attention_impl=attention_impl)


def _llm(config: ModelConfig, attention_impl: str):
    cfg1 = dataclasses.replace(config.llm, n_layers=1)
    run = _run(config, attention_impl)
    return nnx.eval_shape(lambda: LLM(cfg1, rngs=nnx.Rngs(0), lora=lora_lib.lora_for(config, "llm"), run=run))


def llm_layer_piece(config: ModelConfig, *, batch: int, seq: int, attention_impl: str, index: int = 0) -> _Piece:
    """The decoder layer the pipelined step runs (``LLM.stage_layer`` in the runtime's signature), on [batch, seq]."""
    if config.llm.is_moe_layer(index) != config.llm.is_moe_layer(0):
        raise ValueError(f"layer {index} is {'' if config.llm.is_moe_layer(index) else 'not '}an MoE layer unlike "
                         f"layer 0: a pipeline stage stacks one layer kind")
    llm = _llm(config, attention_impl)
    layer_fn, window_codes = _stage_layer(llm)
    values, _ = llm.layer_params()
    p = {"weights": jax.tree.map(lambda a: _sds(a.shape[1:], a.dtype), values)}
    lora_only = lora_lib.lora_for(config, "llm") is not None
    mask = {"weights": _mask(p["weights"], llm_layers_trainable(config), lora_only)}
    if window_codes is not None:
        p["window"], mask["window"] = _sds((), jnp.float32), False
    tok = _sds((batch, seq), jnp.int32)
    aux = {"positions": tok, "segment_ids": tok, "span_ids": tok}
    key = ("llm_layer", config.llm, config.lora, config.dtype, batch, seq, attention_impl)
    return _Piece(key, layer_fn, p, mask, _sds((batch, seq, config.llm.d_model), _compute_dtype(config)), aux)


def head_piece(config: ModelConfig, *, batch: int, seq: int, attention_impl: str) -> _Piece:
    """The last stage's loss (final norm, logits, cross entropy) on one chunk of the whole sequence."""
    cfg1 = dataclasses.replace(config.llm, n_layers=1)
    run = _run(config, attention_impl)
    p = jax.eval_shape(lambda: LLM(cfg1, rngs=nnx.Rngs(0), run=run).head_params())
    mask = _mask(p, llm_base_trainable(config), False)
    cfg = config.llm

    def fn(hp, h, aux):
        return head_loss(hp, h, aux["labels"], cfg, chunk=seq)[0]

    key = ("head", cfg, config.dtype, batch, seq)
    return _Piece(key, fn, p, mask, _sds((batch, seq, cfg.d_model), _compute_dtype(config)),
                  {"labels": _sds((batch, seq), jnp.int32)})


def encoder_layer_piece(config: ModelConfig, name: str, *, instances: int, tokens: int, attention_impl: str):
    """One transformer layer of encoder ``name`` (mllm_jax.encoder) on [instances, tokens, d]."""
    ecfg = config.encoders[name]
    if not isinstance(ecfg, (VisionConfig, AudioConfig)):
        raise ValueError(f"encoder {name!r}: compiled layer costs support VisionConfig and AudioConfig towers; got "
                         f"{type(ecfg).__name__}")
    lora = lora_lib.lora_for(config, name)
    audio = isinstance(ecfg, AudioConfig)  # Whisper's k projection has no bias
    layers = nnx.eval_shape(lambda: EncoderLayers(
        ecfg.d_model, ecfg.n_heads, ecfg.d_ff, 1, rngs=nnx.Rngs(0), k_bias=not audio,
        lora_rank=lora.rank if lora is not None else None,
        lora_targets=lora_lib.encoder_targets(lora) if lora is not None else ()))
    run = _run(config, attention_impl, lora.alpha / lora.rank if lora is not None else 0.0)

    def call(layers, h, aux):
        return apply_encoder_layers(layers, h, 1, act=ecfg.activation, eps=ecfg.norm_eps, run=run)

    x = _sds((instances, tokens, ecfg.d_model), _compute_dtype(config))
    piece = _module_piece(None, layers, call, x, None, trainable=config.is_trainable(f"encoders/{name}"),
                          lora_only=lora is not None)
    key = ("encoder_layer", type(ecfg).__name__, ecfg.d_model, ecfg.n_heads, ecfg.d_ff, ecfg.activation,
           audio, lora, config.dtype, instances, tokens, attention_impl)
    return dataclasses.replace(piece, key=key)


def stem_piece(config: ModelConfig, name: str, *, instances: int, tokens: int, attention_impl: str):
    """Encoder ``name``'s input stem: a vision tower's patch + position embedding (and pre-norm), Whisper's two
    convolutions + positions (+ its final norm: the tower built with no layers)."""
    ecfg = config.encoders[name]
    trainable = config.is_trainable(f"encoders/{name}")
    dtype = _compute_dtype(config)
    scale = 1.0
    if isinstance(ecfg, VisionConfig):
        patches = tokens - (1 if ecfg.class_token else 0)
        grid = max(1, round(math.sqrt(patches)))
        # The patch grid of its tokens (HF rounds image_size / patch_size down: SigLIP-so400m's 384 / 14 is 27).
        ecfg = dataclasses.replace(ecfg, image_size=grid * ecfg.patch_size)
        scale = tokens / ecfg.num_positions
        one = config.replace(encoders={**config.encoders, name: dataclasses.replace(ecfg, n_layers=1)})
        enc = nnx.eval_shape(lambda: build_encoder(one, name, rngs=nnx.Rngs(0)))
        x = _sds((instances, ecfg.image_size, ecfg.image_size, ecfg.num_channels), jnp.float32)

        def call(m, h, aux):
            return m.embed(h)

        # The stem's own leaves only (the tower was built with one layer it never runs).
        keep = lambda path: path[0] not in ("layers", "post_norm")  # noqa: E731
    elif isinstance(ecfg, AudioConfig):
        if tokens != ecfg.num_positions:
            scale = tokens / ecfg.num_positions
        one = config.replace(encoders={**config.encoders, name: dataclasses.replace(ecfg, n_layers=0)})
        enc = nnx.eval_shape(lambda: build_encoder(one, name, rngs=nnx.Rngs(0)))
        x = _sds((instances, ecfg.num_frames, ecfg.n_mels), jnp.float32)

        def call(m, h, aux):
            return m(h)

        keep = lambda path: True  # noqa: E731
    else:
        raise ValueError(f"encoder {name!r}: compiled layer costs support VisionConfig and AudioConfig towers; got "
                         f"{type(ecfg).__name__}")
    piece = _module_piece(None, enc, call, x, None, trainable=trainable, lora_only=False, keep=keep, scale=scale)
    key = ("stem", ecfg, config.dtype, instances, attention_impl)
    return dataclasses.replace(piece, key=key)


def projector_piece(config: ModelConfig, name: str, *, instances: int, tokens: int, d_in: int, attention_impl: str):
    pcfg = config.projectors[name]
    run = _run(config, attention_impl)
    proj = nnx.eval_shape(lambda: Projector(pcfg, d_in, config.llm.d_model, rngs=nnx.Rngs(0), run=run))

    def call(m, h, aux):
        return m(h)

    piece = _module_piece(None, proj, call, _sds((instances, tokens, d_in), _compute_dtype(config)), None,
                          trainable=config.is_trainable(f"projectors/{name}"), lora_only=False)
    key = ("projector", pcfg, d_in, config.llm.d_model, config.dtype, instances, tokens, attention_impl)
    return dataclasses.replace(piece, key=key)


def mask_key(mask) -> tuple:
    return tuple(bool(m) for m in jax.tree.leaves(mask))


# ----------------------------------------------------------------------------------------------------------------
# Compiling a piece's ops.


def _program(piece: _Piece, op: str):
    """(function, its abstract arguments) of op ``op`` of ``piece``."""
    split = ParamSplit(piece.p, piece.mask)
    if op == "f":
        return (lambda p, x, aux: piece.fn(p, x, aux)), (piece.p, piece.x, piece.aux)
    g = jax.eval_shape(piece.fn, piece.p, piece.x, piece.aux)
    dx, dw = {"b": (True, False), "w": (False, True), "bw": (True, True)}[op]

    def run(p, x, g, aux):
        return layer_grads(piece.fn, p, x, g, aux, dx=dx, dw=dw, split=split)

    return run, (piece.p, piece.x, g, piece.aux)


class CompileDevice:
    """Where programs are compiled: one device of the target (its own compiler), or the host CPU."""

    def __init__(self, target: Target | None):
        self.target = target
        dev = target.devices()[0] if target is not None else jax.devices("cpu")[0]
        self.mesh = jax.sharding.Mesh(np.array([dev]), ("cost",))
        self.name = target.topology if target is not None else "cpu"
        # On the host: the dense path (impl "xla" tiles long sequences in a loop, whose body cost_analysis counts once).
        self.attention_impl = target.attention_impl if target is not None else "dense"

    def place(self, tree):
        sh = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            tree)


def compile_op(piece: _Piece, op: str, device: CompileDevice) -> dict:
    """{"flops", "bytes", "seconds" (roofline on the target's chip, None on cpu), "cost" (the planner's unit)}."""
    # F and B do not depend on which weights train (weights are constants of both): one compile whatever the mask.
    key = (piece.key, mask_key(piece.mask) if op in ("w", "bw") else None, op, device.name)
    if key in _CACHE:
        return _CACHE[key]
    if str(key) in _DISK["figures"]:
        _CACHE[key] = dict(_DISK["figures"][str(key)])
        return _CACHE[key]
    fn, args = _program(piece, op)
    compiled, compile_s, lowered = compile_on_target(jax.jit(fn), device.place(args), device.mesh,
                                                     what=f"{device.name}: {piece.key[0]} op {op}")
    cost = _cost(compiled, lowered)
    flops = float(cost.get("flops", 0.0)) * piece.scale
    nbytes = float(cost.get("bytes accessed", 0.0)) * piece.scale
    if device.target is not None and device.target.platform == "gpu" and not cost.get("flops"):
        raise RuntimeError(f"{device.name}: the GPU back end gives no cost analysis without a device; compile for a "
                           f"TPU target or cpu")
    if device.target is None:
        seconds, unit = None, flops
    else:
        chip = device.target.chip
        seconds = max(flops / chip.peak_flops, nbytes / chip.hbm_bandwidth)
        unit = seconds * chip.peak_flops
    _CACHE[key] = {"flops": flops, "bytes": nbytes, "seconds": seconds, "cost": unit, "compile_s": compile_s}
    if _DISK["path"] is not None:
        _DISK["figures"][str(key)] = _CACHE[key]
        with open(_DISK["path"], "w") as fh:
            json.dump(_DISK["figures"], fh)
    return _CACHE[key]


def use_cache_file(path: str | None) -> None:
    """Keep every compiled figure in the JSON file ``path`` too (read now if it exists): a run that stops resumes
    without compiling again. None: memory only."""
    _DISK["path"], _DISK["figures"] = path, {}
    if path is not None and os.path.exists(path):
        with open(path) as fh:
            _DISK["figures"] = json.load(fh)


# ----------------------------------------------------------------------------------------------------------------
# The table of a model.


def _needed(costed, ops: str) -> tuple:
    """The ops a CostedLayer's position runs by the frozen rule (f always), or all of them."""
    if ops == "all":
        return OPS
    dx, dw = costed.needs_dx, costed.layer.has_trainable
    return ("f",) + (("b",) if dx else ()) + (("w",) if dw else ()) + (("bw",) if dx and dw else ())


def compiled_layer_costs(config: ModelConfig, *, text_tokens: int, microbatch_size: int = 1, target=None,
                         ops: str = "needed", instances=None, encoder_tokens=None, feature_tokens=None,
                         log=None) -> LayerCosts:
    """The LayerCosts table of ``config`` for microbatches of ``microbatch_size`` sequences (``pipeline_costs``'
    shape arguments), compiled for ``target`` (a targets.Target, or None / "cpu" for the host). ``ops``: "needed"
    (what the frozen rule runs at each layer's position) or "all". ``figures`` of the result: per layer kind and op,
    the compiled FLOPs, bytes and roofline seconds."""
    table, figures, _ = _compiled(config, text_tokens=text_tokens, microbatch_size=microbatch_size, target=target,
                                  ops=ops, kw=dict(instances=instances, encoder_tokens=encoder_tokens,
                                                   feature_tokens=feature_tokens), log=log)
    return table


def compiled_row_costs(config: ModelConfig, *, text_tokens: int, target, rows=(1, 2), ops: str = "needed",
                       instances=None, encoder_tokens=None, feature_tokens=None, chip=None, log=None):
    """Per-layer op costs as functions of a microbatch's rows (``pipeline_plan.RowCosts``, what
    ``plan_microbatches`` chooses the microbatch count on): every layer kind compiled for ``target`` (a TPU
    targets.Target, or None / "cpu" for the host) at microbatches of each of ``rows`` rows, its compiled FLOPs and
    bytes each fitted as a + b * rows (``pipeline_plan.fit_row_costs``), priced at the roofline of ``chip`` (default:
    the target's; required on the host). The fixed part is what does not shrink with the rows: the weights every op
    reads again."""
    from mllm_jax.parallel.pipeline_plan import fit_row_costs

    chip = chip if chip is not None else (None if target in (None, "cpu") else target.chip)
    if chip is None:
        raise ValueError("compiled_row_costs prices the roofline on a chip: give a TPU target, or chip= with the host")
    rows = tuple(int(r) for r in rows)
    if len(set(rows)) < 2 or min(rows) < 1:
        raise ValueError(f"rows must name two or more distinct microbatch sizes >= 1; got {rows}")
    kw = dict(instances=instances, encoder_tokens=encoder_tokens, feature_tokens=feature_tokens)
    raw = {r: _compiled(config, text_tokens=text_tokens, microbatch_size=r, target=target, ops=ops, kw=kw,
                        log=log)[2] for r in rows}
    name = "cpu" if target in (None, "cpu") else target.topology
    return fit_row_costs(raw, peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth,
                         source=f"compiled:{name}")


def _compiled(config: ModelConfig, *, text_tokens: int, microbatch_size: int, target, ops: str, kw: dict,
              log=None) -> tuple:
    """(LayerCosts, its figures per layer kind, {layer name: {op: (FLOPs, bytes)}}) compiled at one microbatch
    size."""
    if ops not in ("needed", "all"):
        raise ValueError(f"ops must be 'needed' or 'all'; got {ops!r}")
    if not gives_costs(target):
        raise ValueError(f"per-layer costs compile for TPU targets or the host ('cpu'): the GPU back end gives no "
                         f"cost analysis without a device; got target {target.topology}")
    device = CompileDevice(None if target in (None, "cpu") else target)
    log = log or (lambda *_: None)
    runtime = pipeline_costs(config, text_tokens=text_tokens, microbatch_size=microbatch_size, remat=True,
                             **kw).runtime
    shapes = modality_shapes(config, batch=microbatch_size, **kw)
    seq = text_tokens + sum(sh.injected for sh in shapes.values())
    b, impl = microbatch_size, device.attention_impl
    pieces = {}  # layer name -> (piece, CostedLayer)
    for i, c in enumerate(runtime.llm):
        pieces[c.name] = (llm_layer_piece(config, batch=b, seq=seq, attention_impl=impl, index=i), c)
    pieces[runtime.head.name] = (head_piece(config, batch=b, seq=seq, attention_impl=impl), runtime.head)
    for name, chain in runtime.encoders.items():
        sh = shapes[name]
        for c in chain:
            part = c.name.rsplit("/", 1)[-1]
            if c.name.startswith("projectors/"):
                piece = projector_piece(config, name, instances=sh.instances, tokens=sh.projector_tokens,
                                        d_in=sh.projector_dim, attention_impl=impl)
            elif part == "stem":
                piece = stem_piece(config, name, instances=sh.instances, tokens=sh.tower_tokens,
                                   attention_impl=impl)
            else:
                piece = encoder_layer_piece(config, name, instances=sh.instances, tokens=sh.tower_tokens,
                                            attention_impl=impl)
            pieces[c.name] = (piece, c)
    table, figures = {runtime.embed.name: {op: 0.0 for op in OPS}}, {}
    raw = {runtime.embed.name: {op: (0.0, 0.0) for op in OPS}}
    for lname, (piece, c) in pieces.items():
        row, raw_row = {}, {}
        for op in _needed(c, ops):
            fig = compile_op(piece, op, device)
            row[op] = fig["cost"]
            raw_row[op] = (fig["flops"], fig["bytes"])
            figures.setdefault(piece.key[0] + ":" + lname.split("/")[0] + _kind_suffix(lname), {})[op] = fig
        table[lname], raw[lname] = row, raw_row
    # The chunked loss recomputes each chunk's logits in its backward when the sequence has several chunks.
    hname = runtime.head.name
    head, head_raw = table[hname], raw[hname]
    if chunk_length(b, seq, config.llm.vocab_size) < seq:
        for op in ("b", "w", "bw"):
            if op in head:
                head[op] += head["f"]
                head_raw[op] = tuple(x + y for x, y in zip(head_raw[op], head_raw["f"]))
    source = f"compiled:{device.name}"
    log(f"layer costs {source}: {len(_CACHE)} programs cached")
    return LayerCosts(table, source=source, figures=figures), figures, raw


def _kind_suffix(lname: str) -> str:
    parts = lname.split("/")
    if parts[0] == "encoders":
        return "/" + parts[1] + ("/stem" if parts[-1] == "stem" else "/layer")
    if parts[0] == "projectors":
        return "/" + parts[1]
    return "/head" if parts[-1] == "head" else "/layer"
