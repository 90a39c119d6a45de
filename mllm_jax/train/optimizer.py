"""AdamW with linear warmup and cosine decay, global-norm gradient clipping."""

from __future__ import annotations

import optax

from mllm_jax.train.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    if total_steps < 1:
        raise ValueError(f"TrainConfig.steps must be >= 1; got {total_steps}")
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip_norm is not None:
        if cfg.grad_clip_norm <= 0:
            raise ValueError(f"OptimizerConfig.grad_clip_norm must be positive or None; got {cfg.grad_clip_norm}")
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    # Decay only matrices (and embeddings): norms' scales and biases are left alone, as in most LLM recipes.
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=lambda params: _matrix_mask(params)))
    return optax.chain(*parts)


def _matrix_mask(params):
    import jax

    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)
