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
from mllm_jax.config import AudioConfig, ModelConfig, VisionConfig
from mllm_jax.llm import LLM, check_meta, token_loss
from mllm_jax.projector import Projector
from mllm_jax.vision import VisionEncoder


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
    raise ValueError(f"encoder {name!r}: config must be VisionConfig or AudioConfig; got {type(ecfg).__name__}")


def num_features(config: ModelConfig, name: str) -> int:
    """Projected tokens per encoder instance of modality ``name`` (what feature_index counts in)."""
    return config.features_per_instance(name)


def encoder_is_frozen(config: ModelConfig, name: str) -> bool:
    """Nothing in the encoder is trained (no adapters either): it runs under stop_gradient."""
    return not config.is_trainable(f"encoders/{name}") and lora_lib.lora_for(config, name) is None


def validate_config(config: ModelConfig) -> None:
    enc, proj, ph = set(config.encoders), set(config.projectors), set(config.placeholder_ids)
    if enc != proj or enc != ph:
        raise ValueError(f"encoders {sorted(enc)}, projectors {sorted(proj)} and placeholder_ids {sorted(ph)} must "
                         f"name the same modalities")
    keys = {"llm", *(f"encoders/{n}" for n in enc), *(f"projectors/{n}" for n in enc)}
    bad = [k for k in config.trainable if k not in keys]
    if bad:
        raise ValueError(f"trainable keys {bad} are not among {sorted(keys)}")
    lora_lib.validate(config)
    L.check_layer_loop(config.layer_loop)


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
        with self.scope(f"encoders/{name}"):
            f = self.encoders[name](inputs)
        if encoder_is_frozen(self.config, name):
            f = jax.lax.stop_gradient(f)
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
        index = batch.get("feature_index") or {}
        unknown = [n for n in inputs if n not in self.config.encoders]
        if unknown:
            raise ValueError(f"encoder_inputs has modalities {unknown} that the model has no encoder for "
                             f"(encoders: {sorted(self.config.encoders)})")
        for name in sorted(inputs):
            if name not in index:
                raise ValueError(f"batch has encoder_inputs[{name!r}] but no feature_index[{name!r}]")
            fi = index[name]
            if tuple(fi.shape) != tuple(ids.shape):
                raise ValueError(f"feature_index[{name!r}] shape {tuple(fi.shape)} must equal input_ids shape "
                                 f"{tuple(ids.shape)}")
            feats = self.encode(name, inputs[name])
            n, t, d = feats.shape
            with self.scope("llm"):
                emb = inject(emb, feats.reshape(n * t, d).astype(emb.dtype), jnp.asarray(fi, jnp.int32))
        return emb

    def __call__(self, batch: dict):
        meta = check_meta(TokenMeta(batch["positions"], batch["segment_ids"], batch["span_ids"]),
                          tuple(batch["input_ids"].shape))
        emb = self.embed(batch)
        with self.scope("llm"):
            # Metadata in the LLM's token layout whatever layout the batch came in (e.g. replicated over context):
            # RoPE tables and masks are then computed per shard, not whole on every rank.
            meta = TokenMeta(*(part.constrain(a, ("batch", "length")) for a in meta))
            return self.llm.hidden(emb, meta)

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
