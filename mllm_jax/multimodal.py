"""MultimodalModel: encoders + projectors (one per modality name) feeding an LLM through placeholder injection."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.kernels.meta import TokenMeta
from mllm_jax import layers as L
from mllm_jax import lora as lora_lib
from mllm_jax import partitioning as part
from mllm_jax.audio import AudioEncoder
from mllm_jax.config import AudioConfig, ModelConfig, NativeVisionConfig, VisionConfig
from mllm_jax.llm import LLM, check_meta, check_rope_positions, token_loss
from mllm_jax.native_vision import NativeVisionEncoder
from mllm_jax.projector import Projector
from mllm_jax.vision import VisionEncoder


MEDIA_ATTENTION = ("bidirectional", "causal")  # ModelConfig.media_attention

# The batch's instance-major encoder arrays: raw inputs (pixels, log-mel frames), or a frozen encoder's cached
# pre-projector features (one of the two per modality; docs/contracts.md).
ENCODER_KEYS = ("encoder_inputs", "encoder_features")


def build_encoder(config: ModelConfig, name: str, *, rngs: nnx.Rngs):
    ecfg = config.encoders[name]
    lora = lora_lib.lora_for(config, name)
    kw = dict(rngs=rngs, run=config.run_settings())
    if lora is not None:
        kw.update(lora_rank=lora.rank, lora_targets=lora_lib.encoder_targets(lora),
                  run=config.run_settings(lora_scale=lora.alpha / lora.rank))
    if isinstance(ecfg, VisionConfig):
        return VisionEncoder(ecfg, **kw)
    if isinstance(ecfg, AudioConfig):
        return AudioEncoder(ecfg, **kw)
    if isinstance(ecfg, NativeVisionConfig):  # packed patch rows (docs/native_resolution.md)
        return NativeVisionEncoder(ecfg, **kw)
    raise ValueError(f"encoder {name!r}: config must be VisionConfig, NativeVisionConfig or AudioConfig; got "
                     f"{type(ecfg).__name__}")


def num_features(config: ModelConfig, name: str) -> int:
    """Projected tokens per encoder input row of modality ``name`` (what feature_index counts in): an instance, or a
    native-resolution modality's packed patch row."""
    return config.features_per_row(name)


def encoder_is_frozen(config: ModelConfig, name: str) -> bool:
    """Nothing in the encoder is trained (no adapters either): it runs under stop_gradient."""
    return not config.is_trainable(f"encoders/{name}") and lora_lib.lora_for(config, name) is None


def validate_config(config: ModelConfig) -> None:
    enc, proj, ph = set(config.encoders), set(config.projectors), set(config.placeholder_ids)
    if enc != proj or enc != ph:
        raise ValueError(f"encoders {sorted(enc)}, projectors {sorted(proj)} and placeholder_ids {sorted(ph)} must "
                         f"name the same modalities")
    bad = {i: n for i, n in config.placeholder_aliases.items() if n not in ph or i in config.placeholder_ids.values()}
    if bad:
        raise ValueError(f"placeholder_aliases {bad} must name modalities of placeholder_ids {config.placeholder_ids} "
                         f"with ids that are no modality's placeholder")
    keys = {"llm", *(f"encoders/{n}" for n in enc), *(f"projectors/{n}" for n in enc)}
    bad = [k for k in config.trainable if k not in keys]
    if bad:
        raise ValueError(f"trainable keys {bad} are not among {sorted(keys)}")
    lora_lib.validate(config)
    L.check_layer_loop(config.layer_loop)
    if config.media_attention not in MEDIA_ATTENTION:
        raise ValueError(f"media_attention must be one of {MEDIA_ATTENTION}; got {config.media_attention!r}")
    if config.media_attention == "causal" and config.span_isolated:
        raise ValueError("media_attention='causal' drops the spans that span_isolated=True isolates; set one of them")


def llm_meta(config: ModelConfig, meta: TokenMeta) -> TokenMeta:
    """The metadata the LLM's attention reads: with ``media_attention="causal"`` the spans are dropped (span_ids 0),
    so placeholder tokens attend causally like text (the training forward, the pipelined step and decode)."""
    if config.media_attention == "causal":
        return meta._replace(span_ids=jnp.zeros_like(meta.span_ids))
    return meta


class MultimodalModel(nnx.Module):
    """``model(batch) -> hidden [B, S, D]``; ``model.loss(batch) -> (loss_sum, label_count)``.

    ``rule_table`` ((module key, logical rules), ...) is set by ``build.create_model``: each part is created and run
    under its own rules ("llm", "encoders/<name>", "projectors/<name>"); None runs without layout hints.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, rule_table: tuple | None = None,
                 context_method: str = "allgather"):
        validate_config(config)
        self.config = config
        self.rule_table = rule_table
        encoders, projectors = {}, {}
        for name in sorted(config.encoders):
            with self.scope(f"encoders/{name}"):
                encoders[name] = build_encoder(config, name, rngs=rngs)
            with self.scope(f"projectors/{name}"):
                projectors[name] = Projector(config.projectors[name], config.encoders[name].d_model,
                                             config.llm.d_model, rngs=rngs, run=config.run_settings())
        self.encoders = nnx.Dict(encoders)
        self.projectors = nnx.Dict(projectors)
        with self.scope("llm"):
            self.llm = LLM(config.llm, rngs=rngs, lora=lora_lib.lora_for(config, "llm"),
                           run=config.run_settings(context_method=context_method))

    def scope(self, key: str):
        if self.rule_table is None:
            return contextlib.nullcontext()
        return part.rules_scope(dict(self.rule_table).get(key))

    def encode(self, name: str, inputs):
        """Projected features [N, T', D_llm] of one modality (stop_gradient where nothing of it trains)."""
        return self.project(name, self.encoder_features(name, inputs))

    def encoder_features(self, name: str, inputs):
        """Pre-projector features [N, T, D_enc] of one modality: what a frozen encoder's feature cache stores
        (mllm_jax.data.encoder_cache). A frozen encoder runs under stop_gradient: no backward, no saved residuals."""
        with self.scope(f"encoders/{name}"):
            f = self.encoders[name](inputs)
        if encoder_is_frozen(self.config, name):
            f = jax.lax.stop_gradient(f)
        return f

    def project(self, name: str, f):
        """Pre-projector features [N, T, D_enc] -> projected features [N, T', D_llm] (stop_gradient where nothing of
        the modality trains)."""
        with self.scope(f"projectors/{name}"):
            f = self.projectors[name](f)
        if encoder_is_frozen(self.config, name) and not self.config.is_trainable(f"projectors/{name}"):
            f = jax.lax.stop_gradient(f)
        return f

    def embed(self, batch: dict):
        """Text embeddings with every present modality's features injected at its placeholder positions."""
        ids = batch["input_ids"]
        with self.scope("llm"):
            emb = self.llm.embed_tokens(ids)
        inputs = batch.get("encoder_inputs") or {}
        # Pre-projector features of frozen encoders, read from a feature cache instead of encoding inputs.
        cached = batch.get("encoder_features") or {}
        index = batch.get("feature_index") or {}
        for key, given in (("encoder_inputs", inputs), ("encoder_features", cached)):
            unknown = [n for n in given if n not in self.config.encoders]
            if unknown:
                raise ValueError(f"{key} has modalities {unknown} that the model has no encoder for "
                                 f"(encoders: {sorted(self.config.encoders)})")
        both = sorted(set(inputs) & set(cached))
        if both:
            raise ValueError(f"modalities {both} have both encoder_inputs and encoder_features; give one")
        thawed = [n for n in cached if not encoder_is_frozen(self.config, n)]
        if thawed:
            raise ValueError(f"encoder_features given for {thawed}, whose encoders train: only a frozen encoder's "
                             f"features can be precomputed")
        for name in sorted({*inputs, *cached}):
            key = "encoder_inputs" if name in inputs else "encoder_features"
            if name not in index:
                raise ValueError(f"batch has {key}[{name!r}] but no feature_index[{name!r}]")
            fi = index[name]
            if tuple(fi.shape) != tuple(ids.shape):
                raise ValueError(f"feature_index[{name!r}] shape {tuple(fi.shape)} must equal input_ids shape "
                                 f"{tuple(ids.shape)}")
            if name in inputs:
                feats = self.encode(name, inputs[name])
            else:
                feats = self.project(name, jax.lax.stop_gradient(jnp.asarray(cached[name])))
            n, t, d = feats.shape
            with self.scope("llm"):
                emb = inject(emb, feats.reshape(n * t, d).astype(emb.dtype), jnp.asarray(fi, jnp.int32))
        return emb

    def __call__(self, batch: dict):
        return self.forward_with_aux(batch)[0]

    def forward_with_aux(self, batch: dict):
        """(hidden [B, S, D], the MoE layers' router statistics (moe.MoEStats stacked per MoE layer) or None)."""
        shape = tuple(batch["input_ids"].shape)
        meta = llm_meta(self.config, check_meta(TokenMeta(batch["positions"], batch["segment_ids"],
                                                          batch["span_ids"]), shape))
        rope = check_rope_positions(self.config.llm, batch.get("rope_positions"), shape)
        emb = self.embed(batch)
        with self.scope("llm"):
            # Metadata in the LLM's token layout whatever layout the batch came in (e.g. replicated over context):
            # RoPE tables and masks are then computed per shard, not whole on every rank.
            meta = TokenMeta(*(part.constrain(a, ("batch", "length")) for a in meta))
            if rope is not None:
                rope = part.constrain(rope, ("batch", "length", None))
            return self.llm.hidden_with_aux(emb, meta, rope)

    def loss_terms(self, batch: dict, *, chunk: int | None = None):
        """(loss_sum, label_count, router statistics or None): ``loss`` and what the MoE objective terms need."""
        hidden, stats = self.forward_with_aux(batch)
        return (*self.loss_from_hidden(hidden, batch, chunk=chunk), stats)

    def loss(self, batch: dict, *, chunk: int | None = None):
        """(sum over label tokens of -log p, number of label tokens); the train step divides global by global."""
        return self.loss_from_hidden(self(batch), batch, chunk=chunk)

    def loss_from_hidden(self, hidden, batch: dict, *, chunk: int | None = None):
        """``loss`` given ``hidden = model(batch)`` (for callers that also need the hidden states)."""
        with self.scope("llm"):
            labels = part.constrain(jnp.asarray(batch["labels"], jnp.int32), ("batch", "length"))
            return token_loss(self.llm.head_params(), hidden, labels, self.config.llm, chunk=chunk)


def inject(emb_BSD, feats_FD, index_BS):
    """where(index >= 0, feats[index], emb): static shapes, no scatter."""
    index_BS = part.constrain(index_BS, ("batch", "length"))
    g = part.take_rows(feats_FD, jnp.maximum(index_BS, 0), ("batch", "length", "act_embed"))
    return jnp.where((index_BS >= 0)[..., None], g, emb_BSD)
