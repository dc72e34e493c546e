"""Policy-only decoding of whole chains of thought (greedy or sampled), no tree.

One jitted function per shape: prefill the prompts, then for each step
sample it through the KV cache (the calculator's tokens forced by the task),
apply the task's JAX transition, and stop rows that are done. Returns the
sequences, the transition's verdicts, the value head's estimate at the end
of each chain of thought, and the model token forwards each row cost.

With ``traces=True`` the model writes a search trace (Stream of Search): a
dead end does not end the chain, the model may undo it with ``"#"`` and go
on, for up to the task's ``max_trace_steps`` steps or until the context is
full; the chain ends when solved, at an invalid step (an EOS included) or
when one more step might not fit (then it is cut, unsolved).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alphareason.model.sampling import sample_step
from alphareason.search.env import append_steps
from alphareason.tasks import Task


class Sampler:
    """Decodes ``B`` chains of thought at once: ``sampler(params, key, inputs, greedy=..., temperature=...)``."""

    def __init__(self, task: Task, graphdef, *, seq_len: int, max_steps: int | None = None,
                 traces: bool = False):
        self.task, self.graphdef, self.seq_len, self.traces = task, graphdef, seq_len, traces
        if max_steps is None:
            max_steps = getattr(task, "max_trace_steps", 4 * task.max_steps) if traces else task.max_steps
        self.max_steps = max_steps
        self._jitted = jax.jit(self._rollout, static_argnames=("greedy",))

    def __call__(self, params, key, inputs: dict[str, Any], *, greedy: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0) -> dict[str, jax.Array]:
        """Returns tokens int32[B, T], length, done, solved (bool[B]), final_value float32[B],
        logprob float32[B] (of the model-written tokens) and token_forwards int32[B]."""
        return self._jitted(params, key, inputs, greedy=greedy, temperature=jnp.float32(temperature),
                            top_p=jnp.float32(top_p))

    def _rollout(self, params, key, inputs, *, greedy, temperature, top_p):
        task = self.task
        model = nnx.merge(self.graphdef, params)
        tokens, length = inputs["tokens"], inputs["length"]
        B = tokens.shape[0]
        cache = model.init_cache(B, self.seq_len)
        logits, value_logits, cache = model.prefill(tokens, length, cache)

        def body(i, carry):
            tokens, length, state, done, solved, logits, value_logits, cache, forwards, logprob = carry
            if self.traces:  # a step that might not fit ends the chain (cut, unsolved)
                done = done | (length + task.max_step_len > self.seq_len)
            active = ~done
            tool_fn = None
            if task.tool is not None:
                def tool_fn(step_tokens, step_length):
                    return jax.vmap(task.tool_output)(state, step_tokens, step_length)
            sample = sample_step(model, cache, logits, jax.random.fold_in(key, i),
                                 max_step_len=task.max_step_len, temperature=temperature, top_p=top_p,
                                 greedy=greedy, tool_fn=tool_fn, tool_output_len=task.tool_output_len,
                                 active=active)
            new_state, valid, step_done, reward = jax.vmap(task.step)(state, sample.tokens)

            def keep(new, old):
                mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
                return jnp.where(mask, new, old)

            tokens = jnp.where(active[:, None], append_steps(tokens, length, sample.tokens), tokens)
            length = jnp.where(active, length + sample.length, length)
            state = jax.tree.map(keep, new_state, state)
            solved = jnp.where(active, reward > 0, solved)
            # A trace goes on after a dead end (done by a valid step, reward 0): "#" may undo it.
            ends = (reward > 0) | ~valid if self.traces else step_done | ~valid
            done = done | (active & ends)
            forwards = forwards + jnp.where(active, sample.length, 0)
            logprob = logprob + jnp.where(active, sample.logprob, 0.0)
            value_logits = jnp.where(active, sample.value_logits, value_logits)
            return (tokens, length, state, done, solved, sample.logits, value_logits, sample.cache,
                    forwards, logprob)

        carry = (tokens, length, inputs["task_state"], inputs["done"], jnp.zeros_like(inputs["done"]),
                 logits, value_logits, cache, length.astype(jnp.int32), jnp.zeros((B,), jnp.float32))
        # Stops early once every row is done (a trace may take far fewer than max_steps steps).
        _, (tokens, length, _, done, solved, _, value_logits, _, forwards, logprob) = jax.lax.while_loop(
            lambda c: (c[0] < self.max_steps) & ~jnp.all(c[1][3]),
            lambda c: (c[0] + 1, body(c[0], c[1])), (jnp.int32(0), carry))
        return {"tokens": tokens, "length": length, "done": done, "solved": solved,
                "final_value": jax.nn.sigmoid(value_logits.astype(jnp.float32)),
                "logprob": logprob, "token_forwards": forwards}
