"""Self-play learner losses: distil the search back into the network.

For a batch of replayed moves (``B`` states, ``K`` candidates, ``S`` tokens
per step):

* policy: cross-entropy between the search's ``action_weights`` and the
  softmax over the K candidates of their log-likelihoods under the current
  network (the quantity the search uses as its prior), corrected like the
  prior for candidates drawn without replacement (``selfplay_loss``'s
  ``sampled_set_correction``). Invalid candidates
  stay in the softmax with target 0, so the network learns to avoid them;
  only repeated candidates are left out. The log-likelihoods come from one
  parallel pass over ``[state | cand_0 | ... | cand_{K-1}]``
  (``Transformer.score_continuations``), equal to the search's cached
  decoding (tested at 1e-5);
* value: binary cross-entropy between the value head at the state's last
  token and the target: the episode's verified outcome (Monte-Carlo return,
  ``value_target="outcome"``), the search's root value (``"search_q"``) or
  the TD(lambda) mix of the following states' search values and the outcome
  (``"td_lambda"``, ``selfplay.value_lambda``; the replay computes it), or
  whether the state is proven solvable: the search from it or from a later
  state of the episode reached a solved chain, or the episode was solved
  (``"proven"``, ``replay.proven_solvable``);
* optional SFT term: next-token cross-entropy on solved trajectories (the
  expert-iteration / ReST / STaR signal).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from alphareason import tokenizer as tok
from alphareason.search.env import NEG_INF, first_duplicates, score_candidates
from alphareason.train.losses import sft_loss

VALUE_TARGETS = ("outcome", "search_q", "td_lambda", "proven")
POLICY_TARGETS = ("softmax", "likelihood")
POLICY_MOVES = ("all", "solved")


def candidate_logits(model, task, tokens, length, candidates, mask, *, length_normalize: bool):
    """Prior logits over candidates under ``model`` (as in the search) and the state's value logit.

    The candidates' log-likelihoods are the quantity the search's prior uses,
    from the project's one candidate scorer (``search.env.score_candidates``).

    Args:
      tokens: int32[B, T], length: int32[B]: the states.
      candidates: int32[B, K, S].
      mask: bool[B, K], the candidates that take part in the softmax.
    Returns:
      (logits float32[B, K] with masked entries at NEG_INF, value_logits float32[B]).
    """
    logprob, num_scored, value_logits = score_candidates(model, task, tokens, length, candidates)
    if length_normalize:
        logprob = logprob / jnp.maximum(num_scored, 1)
    return jnp.where(mask, logprob, NEG_INF), value_logits


def selfplay_loss(model, batch: dict[str, Any], *, task, policy_weight: float = 1.0, value_weight: float = 1.0,
                  sft_weight: float = 0.0, value_target: str = "outcome",
                  length_normalize: bool = False, policy_target: str = "softmax",
                  sampled_set_correction: bool = True, policy_moves: str = "all", tree_value_weight: float = 0.0):
    """Total loss and metrics for one learner batch.

    ``batch`` holds the replay fields (``tokens, length, candidates,
    cand_valid, action_weights, search_value, outcome``; optionally
    ``cand_log_inclusion``) and, when ``sft_weight > 0``, ``sft``: a batch in
    the SFT format (``tokens, targets_mask, value_target, value_mask``).

    ``sampled_set_correction`` (softmax target): the network's logits over the
    candidates are their log-likelihoods minus ``cand_log_inclusion`` (a
    constant), as in the search's prior. The search's target is
    ``softmax(log pi - log q + sigma(Q))`` over the sample; matching it with
    ``softmax(log pi_theta - log q)`` has its optimum at
    ``pi_theta ~ pi * exp(sigma(Q))`` on the sample (the improved policy),
    while ``softmax(log pi_theta)`` would learn ``pi * exp(sigma(Q)) / q``:
    probability moved towards the candidates that were unlikely to be drawn.

    ``policy_moves="solved"``: the policy term averages over the moves of solved episodes only
    (``outcome`` 1); the value term still uses every move.

    ``tree_value_weight > 0`` with ``tree_states`` in the batch (``tokens`` int32[B, T], ``length`` int32[B],
    ``label`` float32[B]): the value head at each state's last token against what its search tree proved
    (``replay.proven_tree_nodes``), cross-entropy.
    """
    if policy_target not in POLICY_TARGETS:
        raise ValueError(f"selfplay.policy_target={policy_target!r}; choose one of {POLICY_TARGETS}")
    if policy_moves not in POLICY_MOVES:
        raise ValueError(f"selfplay.policy_moves={policy_moves!r}; choose one of {POLICY_MOVES}")
    if value_target not in VALUE_TARGETS:
        raise ValueError(f"selfplay.value_target={value_target!r}; choose one of {VALUE_TARGETS}")
    metrics = {}
    loss = jnp.float32(0.0)
    if policy_weight or value_weight:
        # The network's distribution over the K sampled candidates includes the
        # invalid ones, with target weight 0 (the search never takes them): the
        # policy learns to avoid invalid steps instead of leaking probability
        # to them. Repeated candidates are left out (they would count twice), and
        # so are empty ones (all PAD: the slots of enumerated steps that are not
        # legal here). An empty candidate is no step; its log-likelihood is 0, the
        # largest there is, so one of them in the softmax would take nearly all
        # of its mass and leave the legal steps' targets nothing to rank.
        cands = batch["candidates"]
        distinct = ~first_duplicates(cands) & jnp.any(cands != tok.PAD, axis=-1)
        logits, value_logits = candidate_logits(model, task, batch["tokens"], batch["length"], cands, distinct,
                                                length_normalize=length_normalize)
        weights = batch["action_weights"] * batch["cand_valid"]
        has_target = jnp.sum(weights, -1) > 0
        if policy_moves == "solved":
            has_target = has_target & (batch["outcome"] > 0.5)
        target = weights / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-9)
        log_pi = jax.nn.log_softmax(logits, axis=-1)
        if policy_target == "softmax":
            log_p = log_pi
            if sampled_set_correction and "cand_log_inclusion" in batch:
                corrected = jnp.where(distinct, logits - jax.lax.stop_gradient(batch["cand_log_inclusion"]), NEG_INF)
                log_p = jax.nn.log_softmax(corrected, axis=-1)
            per_row = -jnp.sum(jnp.where(distinct, target * log_p, 0.0), axis=-1)
        else:  # "likelihood": the candidates' own log-likelihoods, not renormalised over the K
            per_row = -jnp.sum(jnp.where(weights > 0, target * logits, 0.0), axis=-1)
        policy_loss = jnp.sum(jnp.where(has_target, per_row, 0.0)) / jnp.maximum(jnp.sum(has_target), 1)
        pi = jnp.exp(log_pi)
        entropy = -jnp.sum(jnp.where(distinct, pi * log_pi, 0.0), axis=-1)
        invalid_mass = jnp.sum(jnp.where(distinct & ~batch["cand_valid"], pi, 0.0), axis=-1)
        vt = {"outcome": lambda: batch["outcome"], "td_lambda": lambda: batch["td_lambda"],
              "proven": lambda: batch["proven"],
              "search_q": lambda: jnp.clip(batch["search_value"], 0.0, 1.0)}[value_target]()
        value_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(value_logits, vt))
        value_prob = jax.nn.sigmoid(value_logits)
        loss = loss + policy_weight * policy_loss + value_weight * value_loss
        metrics.update(policy_loss=policy_loss, value_loss=value_loss, policy_entropy=jnp.mean(entropy),
                       value_brier=jnp.mean((value_prob - batch["outcome"]) ** 2),
                       target_agreement=jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(target, -1)),
                       invalid_mass=jnp.mean(invalid_mass))
    if tree_value_weight and "tree_states" in batch:
        states = batch["tree_states"]
        _, values = model(states["tokens"])  # [B, T]
        last = jnp.take_along_axis(values, (states["length"] - 1)[:, None], axis=1)[:, 0]
        tree_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(last, states["label"]))
        loss = loss + tree_value_weight * tree_loss
        metrics.update(tree_value_loss=tree_loss, tree_value_accuracy=jnp.mean((last > 0) == (states["label"] > 0.5)),
                       tree_label_mean=jnp.mean(states["label"]))
    if sft_weight and "sft" in batch:
        sft, sft_metrics = sft_loss(model, batch["sft"], policy_weight=1.0, value_weight=0.0)
        loss = loss + sft_weight * sft
        metrics["sft_loss"] = sft_metrics["policy_loss"]
    metrics["loss"] = loss
    return loss, metrics
