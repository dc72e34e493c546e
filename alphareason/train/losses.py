"""Learner losses: supervised next-token policy loss and the value loss.

``sft_loss`` trains both heads of the transformer on demonstration batches
(``alphareason.data``): the policy to predict the model-written tokens of a
chain of thought, the value head to predict whether the chain ends solved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_loss(model, batch, *, policy_weight: float = 1.0, value_weight: float = 1.0):
    """Policy cross-entropy + value binary cross-entropy on one batch.

    Args:
      model: a ``Transformer``: ``tokens [B, T] -> (logits [B, T, V], value_logits [B, T])``.
      batch: dict of arrays:
        tokens: int32[B, T], BOS prompt steps EOS, PAD after.
        targets_mask: f32[B, T], 1 where ``tokens[:, t]`` is a training target
          predicted from position ``t - 1`` (model-written characters, SEPs,
          EOS); 0 for BOS, prompt, PAD and tool-written characters, and
          everywhere in negative examples. Column 0 is ignored.
        value_target: f32[B, T] (the label of each state) or f32[B] (one label per chain).
        value_mask: f32[B, T], positions whose value prediction is trained.
      policy_weight, value_weight: the loss is
        ``policy_weight * policy_loss + value_weight * value_loss``.

    Returns:
      ``(loss, metrics)``; metrics: loss, policy_loss, value_loss,
      token_accuracy, value_accuracy, num_target_tokens. Each mean is over the
      masked positions (0 when a mask is empty).
    """
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    targets_mask = jnp.asarray(batch["targets_mask"], jnp.float32)[:, 1:]  # [B, T-1]
    value_target = jnp.asarray(batch["value_target"], jnp.float32)
    value_target = value_target if value_target.ndim == 2 else value_target[:, None]  # [B, T] or [B, 1]
    value_mask = jnp.asarray(batch["value_mask"], jnp.float32)  # [B, T]

    logits, value_logits = model(tokens)
    logits, targets = logits[:, :-1], tokens[:, 1:]  # position t predicts token t + 1
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    policy_loss = _masked_mean(-target_log_probs, targets_mask)
    token_accuracy = _masked_mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32), targets_mask)

    # Binary cross-entropy with logits: -y log s(z) - (1 - y) log s(-z).
    value_logits = value_logits.astype(jnp.float32)
    value_bce = -(value_target * jax.nn.log_sigmoid(value_logits)
                  + (1.0 - value_target) * jax.nn.log_sigmoid(-value_logits))
    value_loss = _masked_mean(value_bce, value_mask)
    value_accuracy = _masked_mean(((value_logits > 0) == (value_target > 0.5)).astype(jnp.float32), value_mask)

    loss = policy_weight * policy_loss + value_weight * value_loss
    metrics = dict(loss=loss, policy_loss=policy_loss, value_loss=value_loss, token_accuracy=token_accuracy,
                   value_accuracy=value_accuracy, num_target_tokens=jnp.sum(targets_mask))
    return loss, metrics
