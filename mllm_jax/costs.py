"""The model describes its layers to the planners: ModelConfig -> plain layer descriptions (parallel.cost_model.Layer)
with their forward FLOPs, parameters and saved activations, resolved into per-microbatch ModelCosts / PipelineCosts.

FLOPs count 2 per multiply-add, with the per-token and per-pair formulas of parallel.cost_model.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig, VisionConfig
from mllm_jax.parallel.cost_model import (Layer, ModelCosts, PipelineCosts, apply_profile,
                                          attention_flops_per_pair, causal_pairs, cost_chain,
                                          decoder_linear_flops_per_token)

__all__ = ["ModalityShapes", "ProjectorConfig", "causal_pairs", "cost_chain", "encoder_layers", "llm_embedding",
           "llm_head", "llm_layer", "modality_shapes", "model_costs", "pipeline_costs", "projector_layer",
           "step_model_flops"]


def _lora_dims(cfg: LLMConfig) -> dict:
    hd = cfg.resolved_head_dim
    d = cfg.d_model
    return {
        "q": (d, cfg.n_heads * hd),
        "k": (d, cfg.n_kv_heads * hd),
        "v": (d, cfg.n_kv_heads * hd),
        "o": (cfg.n_heads * hd, d),
        "gate": (d, cfg.d_ff),
        "up": (d, cfg.d_ff),
        "down": (cfg.d_ff, d),
    }


def llm_layer(
    cfg: LLMConfig,
    seq_len: int,
    *,
    index: int = 0,
    batch: int = 1,
    trainable: bool = True,
    lora=None,
    act_dtype_bytes: int = 2,
    attention_pairs: int | None = None,
) -> Layer:
    """One decoder layer on ``batch`` sequences of ``seq_len`` tokens. ``attention_pairs`` overrides the causal pair
    count (e.g. a multimodal mask from mllm_jax.kernels.block_map). An MoE layer (``cfg.is_moe_layer(index)``) counts
    the FLOPs and activations of its ``experts_per_token`` active experts (+ router, shared expert) and the parameters
    of all ``n_experts``: FLOPs from the active parameters, memory from the total."""
    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"seq_len and batch must be positive; got seq_len={seq_len}, batch={batch}")
    d, hd = cfg.d_model, cfg.resolved_head_dim
    hq, hkv = cfg.n_heads, cfg.n_kv_heads
    moe = cfg.is_moe_layer(index)
    n_exp = cfg.n_experts if moe else 1
    top_k = cfg.experts_per_token if moe else 1
    dff = cfg.resolved_moe_d_ff if moe else cfg.d_ff
    shared = cfg.shared_expert_d_ff if moe else 0
    t = seq_len * batch
    weight_flops = t * decoder_linear_flops_per_token(d, hq, hkv, hd, dff, experts_per_token=top_k, n_experts=n_exp)
    weight_flops += t * (3 * 2 * d * shared + (2 * d if shared and cfg.shared_expert_gate else 0))
    pairs = attention_pairs if attention_pairs is not None else causal_pairs(seq_len, cfg.sliding_window)
    free_flops = batch * pairs * attention_flops_per_pair(hq, hd)
    params = d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * dff * n_exp + 2 * d
    params += (d * n_exp if n_exp > 1 else 0) + ((hq + 2 * hkv) * hd if cfg.qkv_bias else 0)
    params += 3 * d * shared + (d if shared and cfg.shared_expert_gate else 0) + (2 * hd if cfg.qk_norm else 0)
    lora_flops, lora_params = 0.0, 0
    if lora is not None and "llm" in lora.modules:
        dims = _lora_dims(cfg)
        for target in lora.targets:
            if target not in dims:
                raise ValueError(f"LoRA target {target!r} is not one of {sorted(dims)}")
            din, dout = dims[target]
            lora_params += lora.rank * (din + dout)
            lora_flops += 2.0 * t * lora.rank * (din + dout)
        trainable = False  # LoRA: the base weights never train
    # Saved per token without remat: norm output, q/k/v, attention output, residual, second norm, gate/up/act.
    act_per_token = 4 * d + (hq + 2 * hkv) * hd + 3 * dff * top_k + 3 * shared
    return Layer(
        name=f"llm/{index}",
        module="llm",
        weight_flops=float(weight_flops),
        free_flops=float(free_flops),
        lora_flops=lora_flops,
        params=int(params),
        lora_params=lora_params,
        trainable=trainable,
        act_bytes=float(t * act_per_token * act_dtype_bytes),
        io_bytes=float(t * d * act_dtype_bytes),
    )


def _encoder_layer(name, module, d, dff, tokens, n_instances, trainable, act_dtype_bytes, gated=False,
                   window_tokens=None, rms_norms=False):
    t = tokens * n_instances
    mlp_mats = 3 if gated else 2
    weight_flops = t * (4 * 2 * d * d + mlp_mats * 2 * d * dff)
    # Bidirectional attention over the instance, or over windows of ``window_tokens`` (Qwen2.5-VL's window layers).
    seen = tokens if window_tokens is None else min(tokens, window_tokens)
    free_flops = n_instances * 4.0 * tokens * seen * d
    # q/k/v/o with biases, the MLP matrices with biases (gated: gate and up of dff, down of d), two norms (LayerNorm:
    # scale and bias; RMSNorm: scale).
    params = 4 * d * d + mlp_mats * d * dff + 4 * d + (mlp_mats - 1) * dff + d + (2 if rms_norms else 4) * d
    return Layer(
        name=name,
        module=module,
        weight_flops=float(weight_flops),
        free_flops=float(free_flops),
        params=int(params),
        trainable=trainable,
        act_bytes=float(t * (6 * d + 2 * dff) * act_dtype_bytes),
        io_bytes=float(t * d * act_dtype_bytes),
    )


def encoder_layers(
    name: str,
    cfg,
    *,
    n_instances: int = 1,
    trainable: bool = True,
    tokens: int | None = None,
    act_dtype_bytes: int = 2,
    temporal_slices: int = 1,
) -> list[Layer]:
    """Stem (patch embedding / Whisper convolutions) and transformer layers of an encoder, for ``n_instances`` images
    or clips per microbatch. ``tokens`` overrides the tokens per instance (native-resolution encoders: its patches,
    required); a native instance of ``temporal_slices`` grid steps (a video) attends within each slice, and a
    window layer within windows."""
    module = f"encoders/{name}"
    if n_instances < 0:
        raise ValueError(f"n_instances must be >= 0; got {n_instances}")
    if isinstance(cfg, VisionConfig):
        t = tokens if tokens is not None else cfg.num_positions
        patch_in = cfg.patch_size * cfg.patch_size * cfg.num_channels
        stem = Layer(
            name=f"{module}/stem",
            module=module,
            weight_flops=2.0 * n_instances * t * patch_in * cfg.d_model,
            params=patch_in * cfg.d_model,
            trainable=trainable,
            io_bytes=float(n_instances * t * patch_in * act_dtype_bytes),
            act_bytes=float(n_instances * t * patch_in * act_dtype_bytes),
        )
    elif isinstance(cfg, AudioConfig):
        t = tokens if tokens is not None else cfg.num_positions
        frames = 2 * t
        stem = Layer(
            name=f"{module}/stem",
            module=module,
            weight_flops=2.0 * n_instances * (frames * 3 * cfg.n_mels * cfg.d_model + t * 3 * cfg.d_model**2),
            params=3 * cfg.n_mels * cfg.d_model + 3 * cfg.d_model**2,
            trainable=trainable,
            io_bytes=float(n_instances * frames * cfg.n_mels * act_dtype_bytes),
            act_bytes=float(n_instances * (frames * cfg.n_mels + frames * cfg.d_model) * act_dtype_bytes),
        )
    elif isinstance(cfg, NativeVisionConfig):
        if tokens is None:
            raise ValueError(f"encoder {name!r} is native-resolution: give its patches per instance (tokens=...)")
        t = tokens
        stem = Layer(
            name=f"{module}/stem",
            module=module,
            weight_flops=2.0 * n_instances * t * cfg.patch_dim * cfg.d_model,
            params=cfg.patch_dim * cfg.d_model,
            trainable=trainable,
            io_bytes=float(n_instances * t * cfg.patch_dim * act_dtype_bytes),
            act_bytes=float(n_instances * t * cfg.patch_dim * act_dtype_bytes),
        )
    else:
        raise ValueError(f"encoder {name!r}: config must be a VisionConfig, NativeVisionConfig or AudioConfig; got "
                         f"{type(cfg).__name__}")
    gated = bool(getattr(cfg, "gated_mlp", False)) or getattr(cfg, "kind", "") == "qwen2_5_vl"
    layers = [stem]
    for i in range(cfg.n_layers):
        layers.append(
            _encoder_layer(
                f"{module}/{i}", module, cfg.d_model, cfg.d_ff, t, n_instances, trainable, act_dtype_bytes, gated,
                window_tokens=_attended_patches(cfg, i, t, temporal_slices),
                rms_norms=getattr(cfg, "kind", "") == "qwen2_5_vl",
            )
        )
    return layers


def _attended_patches(cfg, layer: int, tokens: int, slices: int) -> int | None:
    """Keys per query of a native tower's layer: its temporal slice, or its window in a window layer (None: a fixed
    tower, whose layers attend over the whole instance)."""
    if not isinstance(cfg, NativeVisionConfig):
        return None
    if slices < 1 or tokens % slices:
        raise ValueError(f"temporal_slices ({slices}) must be >= 1 and divide the instance's {tokens} patches")
    per_slice = tokens // slices
    if not cfg.window_size or layer in cfg.full_attention_layers:
        return per_slice
    return min(per_slice, (cfg.window_size // cfg.patch_size) ** 2)


def projector_layer(
    name: str, cfg: ProjectorConfig, d_in: int, d_out: int, tokens: int, *, trainable=True, act_dtype_bytes=2,
    instances: int = 1,
) -> Layer:
    """Projector from ``d_in`` encoder features to ``d_out`` LLM embeddings on ``tokens`` feature tokens (of
    ``instances`` images/clips: a gemma3 projector pools each instance's grid)."""
    module = f"projectors/{name}"
    if cfg.kind == "linear":
        params = d_in * d_out + d_out
        flops = 2.0 * tokens * d_in * d_out
        act = tokens * d_in
    elif cfg.kind == "mlp":
        h = cfg.hidden_dim or d_out
        params = d_in * h + h * d_out + h + d_out
        flops = 2.0 * tokens * (d_in * h + h * d_out)
        act = tokens * (d_in + 2 * h)
    elif cfg.kind == "resampler":
        q = cfg.num_queries
        per = 2.0 * (2 * q * d_out * d_out + 2 * tokens * d_in * d_out) + 2.0 * 2 * q * d_out * 4 * d_out
        flops = cfg.n_layers * per
        params = cfg.n_layers * (2 * d_out * d_out + 2 * d_in * d_out + 8 * d_out * d_out) + q * d_out
        act = tokens * d_in + cfg.n_layers * q * 8 * d_out
    elif cfg.kind == "patch_merger":  # norm, merge_size**2 patches concatenated, Linear-GELU-Linear
        m2 = cfg.merge_size**2
        din = d_in * m2
        h = cfg.hidden_dim or din
        params = din * h + h * d_out + h + d_out + (d_in if cfg.norm == "rms" else 2 * d_in)
        flops = 2.0 * (tokens // m2) * (din * h + h * d_out)
        act = tokens * d_in + (tokens // m2) * 2 * h
    elif cfg.kind == "gemma3":  # average pooling, RMSNorm, Linear without bias on the pooled tokens
        if instances < 1 or tokens % instances:
            raise ValueError(f"projector {name!r}: {tokens} tokens do not split over {instances} instances")
        pooled = instances * cfg.output_tokens(tokens // instances)
        params = d_in * d_out + d_in
        flops = 2.0 * pooled * d_in * d_out
        act = tokens * d_in + 2 * pooled * d_in
    else:
        raise ValueError(f"projector {name!r}: kind must be linear, mlp, resampler, patch_merger or gemma3; got "
                         f"{cfg.kind!r}")
    free = 4.0 * cfg.num_queries * tokens * d_out * cfg.n_layers if cfg.kind == "resampler" else 0.0
    if cfg.kind == "gemma3":
        free = float(tokens * d_in)  # the pooling's sums
    return Layer(
        name=module,
        module=module,
        weight_flops=float(flops),
        free_flops=float(free),
        params=int(params),
        trainable=trainable,
        act_bytes=float(act * act_dtype_bytes),
        io_bytes=float(tokens * d_in * act_dtype_bytes),
    )


def llm_head(cfg: LLMConfig, seq_len: int, *, batch=1, trainable=True, act_dtype_bytes=2) -> Layer:
    """Final norm, logits and cross entropy (the last pipeline stage holds it; tied embeddings count here too)."""
    t = seq_len * batch
    return Layer(
        name="llm/head",
        module="llm",
        weight_flops=2.0 * t * cfg.d_model * cfg.vocab_size,
        free_flops=5.0 * t * cfg.vocab_size,
        params=cfg.d_model * cfg.vocab_size + cfg.d_model,
        trainable=trainable,
        act_bytes=float(t * cfg.d_model * act_dtype_bytes),  # chunked cross entropy: never the full logits
        io_bytes=float(t * cfg.d_model * act_dtype_bytes),
    )


def llm_embedding(cfg: LLMConfig, *, trainable=True) -> Layer:
    """The embedding lookup: no FLOPs worth counting but parameters (and their optimizer state) on stage 0."""
    params = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return Layer(name="llm/embed", module="llm", weight_flops=0.0, params=params, trainable=trainable)


@dataclass(frozen=True)
class ModalityShapes:
    """One modality's shapes in one microbatch: ``instances`` images/clips, ``tower_tokens`` tokens each through the
    encoder (``given_tokens``: the override, None when the config's own count is used), ``projector_tokens`` tokens
    of width ``projector_dim`` each into the projector, ``injected`` LLM tokens per sequence."""

    instances: int
    tower_tokens: int
    given_tokens: int | None
    projector: ProjectorConfig
    projector_tokens: int
    projector_dim: int
    injected: int


def modality_shapes(config: ModelConfig, *, instances: dict | None = None, encoder_tokens: dict | None = None,
                    feature_tokens: dict | None = None, batch: int = 1) -> dict:
    """{encoder name: ModalityShapes} for microbatches of ``batch`` sequences (model_costs' arguments): the one home of
    these counts for the analytic costs and the compiled ones (mllm_jax.train.layer_costs)."""
    instances = dict(instances or {})
    encoder_tokens = dict(encoder_tokens or {})
    feature_tokens = dict(feature_tokens or {})
    for name in list(instances) + list(encoder_tokens) + list(feature_tokens):
        if name not in config.encoders:
            raise ValueError(f"unknown encoder {name!r}; the model has {sorted(config.encoders)}")
    out = {}
    for name, ecfg in config.encoders.items():
        # A native-resolution instance is priced as a full patch row unless its patches are given.
        given = encoder_tokens.get(name) or (ecfg.patches_per_row if config.is_native_resolution(name) else None)
        # Tokens handed to the projector (CLIP-style towers drop the class token here).
        tokens = given or ecfg.num_features
        pcfg = config.projectors.get(name, ProjectorConfig())
        d_in = ecfg.d_model
        if name in feature_tokens:
            d_in = ecfg.d_model * tokens // feature_tokens[name]
            tokens = feature_tokens[name]
        out[name] = ModalityShapes(
            instances=instances.get(name, 1) * batch,
            tower_tokens=given or ecfg.num_positions,
            given_tokens=given,
            projector=pcfg,
            projector_tokens=tokens,
            projector_dim=d_in,
            injected=pcfg.output_tokens(tokens) * instances.get(name, 1),
        )
    return out


def model_costs(
    config: ModelConfig,
    *,
    text_tokens: int,
    instances: dict | None = None,
    encoder_tokens: dict | None = None,
    feature_tokens: dict | None = None,
    batch: int = 1,
    remat: bool | None = None,
    frozen_aware: bool = True,
    act_dtype_bytes: int = 2,
    llm_profile: dict | None = None,
) -> ModelCosts:
    """Per-microbatch costs of a ModelConfig. The LLM sequence is ``text_tokens`` plus every injected feature token.

    ``instances``: {encoder name: images/clips per sequence} (default 1); ``encoder_tokens``: {name: tokens per
    instance} overriding the config (native-resolution encoders); ``feature_tokens``: {name: tokens per instance
    the projector emits} for encoders that merge patches before projecting (Qwen2-VL 2x2, Qwen2-Audio pooling: the
    projector then sees the merged tokens with proportionally wider features); otherwise projectors keep the token
    count (a resampler emits num_queries). ``remat``: None -> config.remat != "none".
    """
    remat = (config.remat != "none") if remat is None else remat
    d_llm = config.llm.d_model
    encoders = {}
    any_encoder_trains = False
    shapes = modality_shapes(config, instances=instances, encoder_tokens=encoder_tokens,
                             feature_tokens=feature_tokens, batch=batch)
    for name, ecfg in config.encoders.items():
        sh = shapes[name]
        enc_layers = encoder_layers(
            name,
            ecfg,
            n_instances=sh.instances,
            trainable=config.is_trainable(f"encoders/{name}"),
            tokens=sh.given_tokens,
            act_dtype_bytes=act_dtype_bytes,
        )
        proj = projector_layer(
            name,
            sh.projector,
            sh.projector_dim,
            d_llm,
            sh.projector_tokens * sh.instances,
            trainable=config.is_trainable(f"projectors/{name}"),
            act_dtype_bytes=act_dtype_bytes,
            instances=sh.instances,
        )
        chain, trains = cost_chain(enc_layers + [proj], remat=remat, frozen_aware=frozen_aware)
        encoders[name] = chain
        any_encoder_trains |= trains
    seq = text_tokens + sum(sh.injected for sh in shapes.values())
    llm_trains = config.is_trainable("llm")
    embed_layer = llm_embedding(config.llm, trainable=llm_trains)
    layers = [
        llm_layer(
            config.llm,
            seq,
            index=i,
            batch=batch,
            trainable=llm_trains,
            lora=config.lora,
            act_dtype_bytes=act_dtype_bytes,
        )
        for i in range(config.llm.n_layers)
    ]
    if llm_profile:
        layers = apply_profile(layers, llm_profile)
    head_layer = llm_head(config.llm, seq, batch=batch, trainable=llm_trains, act_dtype_bytes=act_dtype_bytes)
    upstream = any_encoder_trains
    (embed,), _ = cost_chain([embed_layer], upstream_trainable=False, remat=remat, frozen_aware=frozen_aware)
    upstream = upstream or embed_layer.has_trainable
    llm_costed, after = cost_chain(layers, upstream_trainable=upstream, remat=remat, frozen_aware=frozen_aware)
    (head,), _ = cost_chain([head_layer], upstream_trainable=after, remat=remat, frozen_aware=frozen_aware)
    return ModelCosts(encoders, embed, llm_costed, head, upstream)


def pipeline_costs(config: ModelConfig, *, text_tokens: int, microbatch_size: int = 1, remat: bool | None = None,
                   **kw) -> PipelineCosts:
    """What parallel.pipeline_plan.plan_pipeline takes, for microbatches of ``microbatch_size`` sequences of
    ``text_tokens`` text tokens plus the injected features; ``kw``: model_costs' instances, encoder_tokens,
    feature_tokens, llm_profile."""
    kw = dict(text_tokens=text_tokens, batch=microbatch_size, remat=remat, **kw)
    aware = model_costs(config, **kw)
    # The runtime rematerialises every layer whatever config.remat says: its op costs are the remat=True ones.
    remats = remat if remat is not None else config.remat != "none"
    return PipelineCosts(aware, model_costs(config, frozen_aware=False, **kw),
                         aware if remats else model_costs(config, **{**kw, "remat": True}))


def step_model_flops(config: ModelConfig, *, rows: int, seq_len: int, instances_per_row: dict) -> dict:
    """Model FLOPs of one train step, the MFU convention: forward plus the frozen-aware backward of every part, no
    remat recompute, for ``rows`` sequences of ``seq_len`` tokens (placeholders included) each carrying
    ``instances_per_row[name]`` encoder instances. {"total", "parts": {"encoders/<name>" (projector included),
    "llm"}}: the same layer costs the pipeline planner uses."""
    # A native-resolution instance is priced as a full patch row (the largest instance a row holds).
    injected = sum(config.features_per_row(n) * k for n, k in instances_per_row.items())
    costs = model_costs(config, text_tokens=max(seq_len - injected, 0), instances=instances_per_row, batch=rows,
                        remat=False)
    parts = {f"encoders/{n}": sum(c.total for c in chain) for n, chain in costs.encoders.items()}
    parts["llm"] = costs.embed.total + sum(c.total for c in costs.llm) + costs.head.total
    return {"total": sum(parts.values()), "parts": parts}
