"""sft_loss: a hand-computed example, masks that really mask, and a few steps that learn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alphareason.model import ModelConfig, Transformer
from alphareason.train.losses import sft_loss

LN = np.log


class FixedModel:
    """Returns given outputs whatever the tokens."""

    def __init__(self, logits, value_logits):
        self.logits, self.value_logits = jnp.asarray(logits, jnp.float32), jnp.asarray(value_logits, jnp.float32)

    def __call__(self, tokens):
        return self.logits, self.value_logits


def hand_example():
    logits = [[[0, 0, LN(2)], [0, 0, 0], [0, 0, 0]],
              [[0, 0, LN(2)], [LN(3), 0, 0], [0, 0, 0]]]
    value_logits = [[0, LN(3), 5], [-LN(3), 9, 9]]
    batch = dict(tokens=np.array([[1, 2, 0], [1, 1, 0]], np.int32),
                 targets_mask=np.array([[0, 1, 0], [0, 1, 1]], np.float32),
                 value_target=np.array([1, 0], np.float32),
                 value_mask=np.array([[0, 1, 0], [1, 0, 0]], np.float32))
    return FixedModel(logits, value_logits), batch


def test_hand_computed_example():
    model, batch = hand_example()
    loss, m = sft_loss(model, batch, policy_weight=1.0, value_weight=0.5)
    # Targets: row 0 token 2 from probs (1/4, 1/4, 1/2): -ln(1/2); row 1 token 1 from the
    # same probs: -ln(1/4); row 1 token 0 from (3/5, 1/5, 1/5): -ln(3/5).
    policy = (LN(2) + LN(4) + LN(5 / 3)) / 3
    # Values: row 0 at position 1, target 1, logit ln 3: -ln(3/4); row 1 at 0, target 0, logit -ln 3: -ln(3/4).
    value = LN(4 / 3)
    np.testing.assert_allclose(m["policy_loss"], policy, rtol=1e-6)
    np.testing.assert_allclose(m["value_loss"], value, rtol=1e-6)
    np.testing.assert_allclose(loss, policy + 0.5 * value, rtol=1e-6)
    np.testing.assert_allclose(m["loss"], loss)
    np.testing.assert_allclose(m["token_accuracy"], 2 / 3, rtol=1e-6)  # argmax 2, 2, 0 vs targets 2, 1, 0
    np.testing.assert_allclose(m["value_accuracy"], 1.0)
    assert float(m["num_target_tokens"]) == 3


def test_masked_entries_do_not_matter():
    model, batch = hand_example()
    base, _ = sft_loss(model, batch)
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][0, 2] = 1  # a target whose mask is 0
    assert float(sft_loss(model, changed)[0]) == float(base)
    changed = dict(batch, value_mask=batch["value_mask"].copy())
    changed["value_mask"][0, 0] = 0.0
    changed["value_mask"][1, 0] = 0.0
    only_row0 = float(sft_loss(model, changed)[1]["value_loss"])
    changed["value_target"] = np.array([1, 1], np.float32)  # row 1 has no value positions left
    assert float(sft_loss(model, changed)[1]["value_loss"]) == only_row0
    # ... and unmasking them does change the loss (so the checks above can fail).
    unmasked = dict(batch, targets_mask=np.array([[0, 1, 1], [0, 1, 1]], np.float32))
    assert float(sft_loss(model, unmasked)[0]) != float(base)
    # Column 0 (BOS, predicted from nothing) is never a target.
    col0 = dict(batch, targets_mask=batch["targets_mask"] + np.array([[1, 0, 0], [1, 0, 0]], np.float32))
    assert float(sft_loss(model, col0)[0]) == float(base)


def test_empty_masks_give_zero_not_nan():
    model, batch = hand_example()
    batch = dict(batch, targets_mask=np.zeros((2, 3), np.float32), value_mask=np.zeros((2, 3), np.float32))
    loss, m = sft_loss(model, batch)
    assert float(loss) == 0.0 and float(m["num_target_tokens"]) == 0


def learnable_batch(batch_size=16, length=12, seed=0):
    """BOS, four digits, '>', the digits reversed, EOS; value target: first digit even."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, 10, (batch_size, 4))
    tokens = np.zeros((batch_size, length), np.int32)
    tokens[:, 0] = 1
    tokens[:, 1:5] = 4 + digits
    tokens[:, 5] = 4 + 16  # '>'
    tokens[:, 6:10] = 4 + digits[:, ::-1]
    tokens[:, 10] = 2  # EOS
    targets_mask = np.zeros((batch_size, length), np.float32)
    targets_mask[:, 6:11] = 1
    value_mask = np.zeros((batch_size, length), np.float32)
    value_mask[:, 1:11] = 1
    return dict(tokens=tokens, targets_mask=targets_mask, value_target=(digits[:, 0] % 2 == 0).astype(np.float32),
                value_mask=value_mask)


def test_real_model_masked_positions_and_training_lowers_the_loss():
    model = Transformer(ModelConfig.micro(), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        (loss, metrics), grads = nnx.value_and_grad(functools.partial(sft_loss, batch=batch), has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    batch = learnable_batch()
    # The last token (PAD, masked everywhere) changes no loss term; the first step's metrics
    # are computed before any update.
    other = dict(batch, tokens=batch["tokens"].copy())
    other["tokens"][:, -1] = 30
    _, m_other = train_step(state, other)
    losses = []
    for _ in range(12):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert float(m_other["loss"]) == pytest.approx(losses[0], abs=1e-6)
    assert losses[-1] < 0.75 * losses[0] and losses[-1] == min(losses), losses
    assert float(metrics["num_target_tokens"]) == 16 * 5
