"""The jitted train and eval steps, written over (graphdef, state) so shardings are explicit and donation works.

The loss function is a parameter (``loss_fn(model, microbatch) -> (loss_sum, label_count)``): the plain one calls
``model.loss`` (context parallelism needs nothing else: the model shards the permuted sequence itself). Gradient
accumulation sums per-microbatch loss sums and gradients and divides once by the global label count, so the result
equals the one-batch gradient exactly (up to float summation order).

A pipelined step (``grads_fn``, e.g. train.pipelined_step.pipelined_loss_and_grad) takes the whole microbatched
batch at once and returns (loss_sum, label_count, grads of loss_sum / label_count); the scan is then skipped.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def model_loss(model, batch):
    """(loss_sum, label_count); an LLM with MoE layers adds (penalty_sum, metrics): see ``moe_model_loss``."""
    if model.config.llm.n_experts:
        return moe_model_loss(model, batch)
    return model.loss(batch)


def moe_model_loss(model, batch):
    """(loss_sum, label_count, penalty_sum, metrics) of a model with MoE layers. The objective is loss_sum /
    label_count + router_aux_loss_coef * aux + router_z_loss_coef * z (aux, z averaged over the MoE layers), so the
    penalty enters the summed loss as label_count * (coef * term): with microbatches each microbatch's terms weigh
    by its label count. metrics: moe_aux_loss, moe_z_loss and the per-layer load imbalance (max / mean tokens per
    expert) [n_moe_layers]."""
    from mllm_jax import moe

    cfg = model.config.llm
    loss_sum, count, stats = model.loss_terms(batch)
    aux, z = moe.objective_terms(stats, cfg)
    penalty = count.astype(jnp.float32) * (cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z)
    return loss_sum, count, penalty, {"moe_aux_loss": aux, "moe_z_loss": z,
                                      "moe_imbalance": moe.load_imbalance(stats)}


def make_train_step(graphdef, trainable, *, loss_fn: Callable = model_loss, schedule: optax.Schedule | None = None,
                    grads_fn: Callable | None = None):
    """Returns step(state, batch) -> (state, metrics). ``metrics["finite"]``: the loss, the gradient norm and every
    updated trainable parameter are finite. ``state`` is nnx.split((model, optimizer))[1]; every leaf of
    ``batch`` has a leading microbatch axis [M, ...]. ``grads_fn(model, batch) -> (loss_sum, label_count, grads)``
    replaces the microbatch scan (a pipeline runs its own microbatches)."""

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        if grads_fn is not None:
            loss_sum, count, grads = grads_fn(model, batch)
            return _update(model, optimizer, grads, loss_sum.astype(jnp.float32), count.astype(jnp.float32))
        gdef, params, rest = nnx.split(model, trainable, ...)

        def micro_loss(p, mb):
            out = loss_fn(nnx.merge(gdef, p, rest), mb)
            loss_sum, count = out[0].astype(jnp.float32), out[1].astype(jnp.float32)
            # (loss_sum, count, penalty_sum, metrics): the penalty (e.g. MoE router losses) is differentiated with
            # the loss but not reported in it; the metrics are averaged over the microbatches.
            penalty, extra = (out[2].astype(jnp.float32), out[3]) if len(out) == 4 else (0.0, {})
            return loss_sum + penalty, (loss_sum, count, extra)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, mb):
            g_acc, s_acc, c_acc, x_acc = carry
            (_, (s, c, x)), g = grad_fn(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, c_acc + c, jax.tree.map(jnp.add, x_acc, x)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda a: a[0], batch)
        extra0 = jax.eval_shape(lambda: grad_fn(params, first)[0][1][2])
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), extra0))
        (g_sum, loss_sum, count, extra), _ = jax.lax.scan(accumulate, init, batch)
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), g_sum)
        m = jax.tree.leaves(batch)[0].shape[0]
        return _update(model, optimizer, grads, loss_sum, count, jax.tree.map(lambda a: a / m, extra))

    def _update(model, optimizer, grads, loss_sum, count, extra=None):
        grad_norm = optax.global_norm(grads)
        lr_step = optimizer.step.value
        optimizer.update(model, grads)
        loss = loss_sum / jnp.maximum(count, 1.0)
        metrics = {"loss": loss, "grad_norm": grad_norm, "label_tokens": count,
                   "finite": _all_finite(loss, grad_norm, nnx.state(model, trainable))}
        if schedule is not None:
            metrics["learning_rate"] = schedule(lr_step)
        metrics.update(extra or {})
        return nnx.state((model, optimizer)), metrics

    return step


def _all_finite(*trees) -> jax.Array:
    """One boolean scalar: every floating-point value of ``trees`` is finite (one fused reduction per array, reduced
    on device). The loop checks it before it keeps or saves the step: an update that makes the parameters NaN or inf
    is caught at the step that made it, not one step later by its loss."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def make_eval_step(graphdef):
    """Returns eval(model_state, batch) -> (loss_sum, label_count, predicted next token [B, S]); batch without the
    microbatch axis."""

    def eval_step(model_state, batch):
        model = nnx.merge(graphdef, model_state)
        loss_sum, count = model.loss(batch)
        logits = model.llm.logits(model(batch))
        return loss_sum.astype(jnp.float32), count.astype(jnp.float32), jnp.argmax(logits, -1).astype(jnp.int32)

    return eval_step
