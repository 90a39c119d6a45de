"""Work per sample, in training FLOPs (forward + frozen-aware backward), from mllm_jax.costs.

Two numbers per sample: encoder work (its images/clips through encoder + projector) and LLM work (its tokens through
the decoder layers and the head, attention counted per computed tile as a block-skipping kernel does). Packed
samples never attend to each other, so a microbatch's work is the sum of its samples' work.
"""

from __future__ import annotations

import numpy as np

from mllm_jax import costs as cost_model


def _total(costed) -> float:
    return float(sum(c.fwd + c.bwd for c in costed))


class WorkloadModel:
    """``workload(tokens, instances) -> (encoder_flops, llm_flops)`` for one sample of a ModelConfig.

    ``instances[name]``: the number of instances of a fixed-size modality, or, for a native-resolution one
    (Qwen2-VL towers), the list of its instances' patch grids (t, h, w), each priced at its own size.
    ``attention_block``: tile size of the attention kernel; a sample of n tokens costs ceil(n/b)(ceil(n/b)+1)/2
    tiles of b*b pairs (None: the exact causal pair count)."""

    def __init__(self, model_config, *, attention_block: int | None = 128, remat: bool | None = None):
        self.config = model_config
        self.block = attention_block
        self.remat = (model_config.remat != "none") if remat is None else remat
        self.encoder_per_instance = {}
        self._native_cache: dict = {}
        any_encoder_trains = False
        for name, ecfg in model_config.encoders.items():
            if model_config.is_native_resolution(name):
                any_encoder_trains |= self._encoder_chain(name, ecfg.merge_units, 1)[1]
                continue
            flops, trains = self._encoder_chain(name, ecfg.num_positions, 1)
            self.encoder_per_instance[name] = flops
            any_encoder_trains |= trains
        self.llm_upstream_trainable = any_encoder_trains or model_config.is_trainable("llm")

    def _encoder_chain(self, name: str, tokens: int, slices: int) -> tuple[float, bool]:
        """(training FLOPs of one instance of ``tokens`` encoder tokens through encoder + projector, whether any of
        it trains)."""
        cfg = self.config
        ecfg = cfg.encoders[name]
        native = cfg.is_native_resolution(name)
        layers = cost_model.encoder_layers(name, ecfg, n_instances=1, trainable=cfg.is_trainable(f"encoders/{name}"),
                                           **(dict(tokens=tokens, temporal_slices=slices) if native else {}))
        pcfg = cfg.projectors.get(name, cost_model.ProjectorConfig())
        proj = cost_model.projector_layer(name, pcfg, ecfg.d_model, cfg.llm.d_model, tokens,
                                          trainable=cfg.is_trainable(f"projectors/{name}"))
        chain, trains = cost_model.cost_chain(layers + [proj], remat=self.remat)
        return _total(chain), trains

    def encoder_flops(self, name: str, instances) -> float:
        """Work of one sample's instances of modality ``name`` (a count, or native grids: see the class)."""
        if name not in self.config.encoders:
            raise ValueError(f"modality {name!r} has no encoder (encoders: {sorted(self.config.encoders)})")
        if not self.config.is_native_resolution(name):
            return self.encoder_per_instance[name] * float(instances)
        total = 0.0
        for grid in instances:
            t, h, w = (int(v) for v in grid)
            if (name, t, h, w) not in self._native_cache:
                self._native_cache[name, t, h, w] = self._encoder_chain(name, t * h * w, t)[0]
            total += self._native_cache[name, t, h, w]
        return total

    def attention_pairs(self, tokens: int) -> int:
        if self.block is None:
            return cost_model.causal_pairs(tokens, self.config.llm.sliding_window)
        nb = -(-tokens // self.block)
        return nb * (nb + 1) // 2 * self.block * self.block

    def llm_flops(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        cfg = self.config
        trainable = cfg.is_trainable("llm")
        layer = cost_model.llm_layer(cfg.llm, tokens, trainable=trainable, lora=cfg.lora,
                                     attention_pairs=self.attention_pairs(tokens))
        # Layers are identical; only the first one's dX depends on what is upstream.
        (first, rest), _ = cost_model.cost_chain([layer, layer], upstream_trainable=self.llm_upstream_trainable,
                                                 remat=self.remat)
        head = cost_model.llm_head(cfg.llm, tokens, trainable=trainable)
        (head_c,), _ = cost_model.cost_chain([head], upstream_trainable=True, remat=self.remat)
        n = cfg.llm.n_layers
        return _total([first]) + (n - 1) * _total([rest]) + _total([head_c])

    def workload(self, tokens: int, instances: dict) -> tuple[float, float]:
        enc = sum(self.encoder_flops(n, k) for n, k in instances.items())
        return float(enc), self.llm_flops(int(tokens))

    def workloads(self, tokens, instances) -> np.ndarray:
        """[n, 2] float64 (encoder, llm) for parallel lists of token counts and {modality: count} dicts."""
        return np.asarray([self.workload(t, i) for t, i in zip(tokens, instances)], np.float64).reshape(-1, 2)
