"""Value diagnostics: does the value head predict whether a state can still be solved?

The test states are those a policy reaches: from held-out problems, chains
are sampled from the policy, and every state along them that is not
finished (the prompt, the end of step 1, 2, ...) is kept, with its depth
(steps taken). Each state gets

* ``v``: the value head's estimate (sigmoid of the value logit at the
  state's last token: what the search reads at a leaf);
* ``V*``: whether the state can still be solved, from the task's exact
  solver (``Task.solvable_after``; an oracle label the search never sees);
* ``mc``: the policy's Monte-Carlo success rate from the state: ``N`` chains
  sampled from it (``ChainDecoder``, the search's candidate temperature),
  judged by the task's transition;
* the policy's legal mass: its probability of writing a legal step next
  (the sum over the task's legal steps), a diagnostic of the policy itself.

A policy that seldom writes a legal step reaches few states past the prompt,
too few to rank (a handful of solvable ones). A search over the task's legal
steps (``search.candidates="enumerate"``) visits legal states whatever the
policy, so the report also ranks the states along random legal walks
(``Task.random_walk``: legal steps drawn uniformly until the chain ends)
against ``V*``, per depth and over all depths (``walks``).

Reported per depth and over all depths (``value_report``): AUC of ``v``
against ``V*`` (where both classes occur), AUC against the rollouts'
outcomes (each state counts as ``mc`` positive and ``1 - mc`` negative),
Brier score and expected calibration error of ``v`` against ``mc`` (the
quantity a value trained on outcomes estimates) and against ``V*``. At the
prompt every generated problem is solvable (``V*`` = 1), so there the AUC
is against whether the greedy policy solves the problem.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alphareason import tokenizer as tok
from alphareason.search.decode import ChainDecoder
from alphareason.search.env import EnvConfig, ReasoningEnv
from alphareason.search.episodes import prompt_lengths
from alphareason.tasks import Problem, Task, split_steps


# ------------------------------------------------------------------ metrics
def auc(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray | None = None) -> float | None:
    """Area under the ROC curve of ``scores`` (f[n]) for weighted labels (Mann-Whitney, ties count 1/2).

    ``positive`` is each item's weight as a positive; ``negative`` its weight
    as a negative (default ``1 - positive``): 0/1 labels give the usual AUC,
    a success rate ``mc`` gives the AUC against the outcomes of rollouts.
    None when one class has no weight.
    """
    scores = np.asarray(scores, np.float64)
    pos = np.asarray(positive, np.float64)
    neg = 1.0 - pos if negative is None else np.asarray(negative, np.float64)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return None
    order = np.argsort(scores, kind="stable")
    s, p, n = scores[order], pos[order], neg[order]
    uniq, start = np.unique(s, return_index=True)
    p_at = np.add.reduceat(p, start)
    n_at = np.add.reduceat(n, start)
    below = np.cumsum(n_at) - n_at  # negative weight with a strictly lower score
    return float(np.sum(p_at * (below + 0.5 * n_at)) / (p.sum() * n.sum()))


def calibration(values: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Brier score and expected calibration error of predictions ``values`` against ``targets`` in [0, 1]."""
    values, targets = np.asarray(values, np.float64), np.asarray(targets, np.float64)
    if len(values) == 0:
        return {"brier": float("nan"), "ece": float("nan")}
    idx = np.minimum((values * bins).astype(int), bins - 1)
    ece = sum(np.mean(idx == b) * abs(values[idx == b].mean() - targets[idx == b].mean())
              for b in range(bins) if np.any(idx == b))
    return {"brier": float(np.mean((values - targets) ** 2)), "ece": float(ece)}


def summarize(v: np.ndarray, vstar: np.ndarray, mc: np.ndarray) -> dict[str, Any]:
    """The diagnostics of one group of states: counts, AUCs, Brier and ECE."""
    has_vstar = ~np.isnan(vstar)
    out: dict[str, Any] = {"states": int(len(v)), "mean_value": float(np.mean(v)) if len(v) else float("nan"),
                           "mean_mc": float(np.mean(mc)) if len(mc) else float("nan")}
    if has_vstar.any():
        out["solvable"] = float(np.mean(vstar[has_vstar]))
        out["solvable_states"] = int(np.sum(vstar[has_vstar] == 1))
        out["auc_vstar"] = auc(v[has_vstar], vstar[has_vstar])
        out.update({f"{k}_vstar": x for k, x in calibration(v[has_vstar], vstar[has_vstar]).items()})
    out["auc_mc"] = auc(v, mc)
    out.update({f"{k}_mc": x for k, x in calibration(v, mc).items()})
    return out


def summarize_vstar(v: np.ndarray, vstar: np.ndarray) -> dict[str, Any]:
    """The diagnostics of states labelled only by ``V*`` (no rollouts): counts, AUC, Brier and ECE."""
    out: dict[str, Any] = {"states": int(len(v)), "solvable_states": int(np.sum(vstar == 1)),
                           "mean_value": float(np.mean(v)) if len(v) else float("nan")}
    if len(v):
        out["solvable"] = float(np.mean(vstar))
        out["auc_vstar"] = auc(v, vstar)
        out.update({f"{k}_vstar": x for k, x in calibration(v, vstar).items()})
    return out


def bootstrap_auc(scores: Sequence[np.ndarray], labels: np.ndarray, clusters: np.ndarray, *,
                  resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """95% percentile intervals of the AUCs of several scorers on the same states, and of their difference.

    ``scores``: one f[n] per scorer (a value head), all on the same ``n`` states; ``labels``: f[n], 0/1
    (``V*``); ``clusters``: int[n], the problem each state comes from. States of one problem are not
    independent (they share numbers and often a prefix), so each resample draws whole problems with
    replacement; resamples with one class empty are dropped. The difference is the last scorer's AUC
    minus the first's, resampled in pairs (the same problems for both), with a two-sided bootstrap p.

    Returns ``{"auc": [a_i], "interval": [[lo_i, hi_i]], "resamples": used}`` and, for two or more
    scorers, ``"difference"``, ``"difference_interval"``, ``"p_value"`` (two-sided, add-one: at least
    ``2 / (resamples + 1)``); None when the AUC is undefined.
    """
    scores = [np.asarray(s, np.float64) for s in scores]
    labels = np.asarray(labels, np.float64)
    point = [auc(s, labels) for s in scores]
    if any(a is None for a in point):
        return None
    ids, members = np.unique(np.asarray(clusters), return_inverse=True)
    by_cluster = [np.flatnonzero(members == c) for c in range(len(ids))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = np.concatenate([by_cluster[c] for c in rng.integers(0, len(ids), len(ids))])
        a = [auc(s[idx], labels[idx]) for s in scores]
        if all(x is not None for x in a):
            draws.append(a)
    draws = np.asarray(draws)  # [used, scorers]
    out: dict[str, Any] = {"auc": point, "resamples": int(len(draws)),
                           "interval": [list(np.percentile(draws[:, i], [2.5, 97.5])) for i in range(len(scores))]}
    if len(scores) > 1:
        diff = draws[:, -1] - draws[:, 0]
        out["difference"] = point[-1] - point[0]
        out["difference_interval"] = list(np.percentile(diff, [2.5, 97.5]))
        n = len(diff)  # add-one: a p of 0 is not something a finite resample can show
        out["p_value"] = float(min(1.0, 2 * min(np.sum(diff <= 0) + 1, np.sum(diff >= 0) + 1) / (n + 1)))
    return out


# ------------------------------------------------------------------- states
def chain_states(task: Task, problem: Problem, text: str) -> list[tuple[str, int]]:
    """The states along one chain: ``(prefix text, depth)`` for the prompt and after every valid step.

    Finished states (solved, dead end) are among them; ``ValueProbe.finished`` tells them apart.
    """
    lines = split_steps(text)[: task.verify(problem, text).num_valid_steps]
    return [("".join(x + "\n" for x in lines[:d]), d) for d in range(len(lines) + 1)]


def walk_states(task: Task, problems: Sequence[Problem], rng: np.random.Generator,
                walks: int) -> tuple[list[int], list[str], list[int]]:
    """The distinct live states along ``walks`` random legal walks from each problem, past the prompt.

    Returns ``(problem index, prefix text, depth)`` per state; empty when the task has no
    ``random_walk``. A walk's last state is finished (solved or a dead end) and is left out.
    """
    index, texts, depths = [], [], []
    for i, p in enumerate(problems):
        seen = set()
        for _ in range(walks):
            text = task.random_walk(p, rng)
            if text is None:
                return [], [], []
            for prefix, d in chain_states(task, p, text)[1:-1]:  # past the prompt, before the end
                if prefix not in seen:
                    seen.add(prefix)
                    index.append(i)
                    texts.append(prefix)
                    depths.append(d)
    return index, texts, depths


def walk_rng(key) -> np.random.Generator:
    """The generator of ``value_report``'s random legal walks from its ``key``: the same key, the same states."""
    return np.random.default_rng(int(jax.random.randint(jax.random.fold_in(key, 3), (), 0, 2 ** 31 - 1)))


class ValueProbe:
    """Compiled pieces for one model graph and task: values of states, Monte-Carlo rollouts from them."""

    def __init__(self, task: Task, graphdef, *, seq_len: int, batch_size: int = 256):
        self.task, self.graphdef, self.seq_len, self.batch_size = task, graphdef, seq_len, batch_size
        self.env = ReasoningEnv(task, graphdef, EnvConfig(num_candidates=1), seq_len=seq_len)
        self.decoder = ChainDecoder(task, graphdef, seq_len=seq_len)

    @functools.partial(jax.jit, static_argnums=0)
    def _values(self, params, tokens, length):
        model = nnx.merge(self.graphdef, params)
        _, value_logits, _ = model.prefill(tokens, length, model.init_cache(tokens.shape[0], self.seq_len))
        return jax.nn.sigmoid(value_logits.astype(jnp.float32))

    def _batches(self, problems: Sequence[Problem], texts: Sequence[str]):
        n, B = len(problems), self.batch_size
        for start in range(0, n, B):
            chunk_p = list(problems[start: start + B])
            chunk_t = list(texts[start: start + B])
            m = len(chunk_p)
            chunk_p += [chunk_p[0]] * (B - m)
            chunk_t += [chunk_t[0]] * (B - m)
            yield start, m, jax.tree.map(jnp.asarray, self.env.after(chunk_p, chunk_t))

    def finished(self, problems: Sequence[Problem], texts: Sequence[str]) -> np.ndarray:
        """bool[n]: the state is terminal by the task's transition (solved or a dead end)."""
        out = np.zeros((len(problems),), bool)
        for start, m, inputs in self._batches(problems, texts):
            out[start: start + m] = np.asarray(inputs["done"])[:m]
        return out

    @functools.partial(jax.jit, static_argnums=0)
    def _legal_mass(self, params, tokens, length, task_state):
        from alphareason.search.env import score_legal_steps
        model = nnx.merge(self.graphdef, params)
        steps, legal = jax.vmap(self.task.legal_steps)(task_state)
        logprob, _, _ = score_legal_steps(model, self.task, tokens, length, jnp.where(legal[..., None], steps, tok.PAD))
        return jnp.sum(jnp.where(legal, jnp.exp(logprob), 0.0), -1)

    def legal_mass(self, params, problems: Sequence[Problem], texts: Sequence[str]) -> np.ndarray:
        """f32[n]: the policy's probability of writing a legal step next (the sum over the task's legal
        steps of their probability, tool tokens excluded); nan for a task without a legal-step generator."""
        out = np.full((len(problems),), np.nan, np.float32)
        try:
            for start, m, inputs in self._batches(problems, texts):
                out[start: start + m] = np.asarray(self._legal_mass(params, inputs["tokens"], inputs["length"],
                                                                    inputs["task_state"]))[:m]
        except NotImplementedError:
            pass
        return out

    def values(self, params, problems: Sequence[Problem], texts: Sequence[str]) -> np.ndarray:
        """f32[n]: the value head at the end of each state (prompt + ``texts[i]``)."""
        out = np.zeros((len(problems),), np.float32)
        for start, m, inputs in self._batches(problems, texts):
            out[start: start + m] = np.asarray(self._values(params, inputs["tokens"], inputs["length"]))[:m]
        return out

    def rollouts(self, params, problems: Sequence[Problem], texts: Sequence[str], key, *, samples: int,
                 temperature: float = 1.0, greedy: bool = False) -> tuple[np.ndarray, list[list[str]]]:
        """``samples`` chains from each state: (solved f32[n, samples], the full texts after the prompt)."""
        solved = np.zeros((len(problems), samples), np.float32)
        full: list[list[str]] = []
        for start, m, inputs in self._batches(problems, texts):
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + self.batch_size))
            out = self.decoder(params, keys, inputs, lanes=samples, greedy=greedy, temperature=temperature)
            out = jax.tree.map(np.asarray, out)
            solved[start: start + m] = out["solved"][:m]
            starts = prompt_lengths(self.task, problems[start: start + m])
            for b in range(m):
                full.append([tok.decode(out["tokens"][b, j, starts[b]: out["length"][b, j]])
                             for j in range(samples)])
        return solved, full


def value_report(model, task: Task, problems: Sequence[Problem], key, *, chains: int = 2, mc_samples: int = 8,
                 temperature: float = 1.0, batch_size: int = 256, walks: int = 4,
                 policy_solved: np.ndarray | None = None, policy: str = "greedy") -> dict[str, Any]:
    """Value diagnostics of ``model`` on states the policy reaches from ``problems`` (see the module doc).

    At the prompt, ``prompt_auc_greedy`` is the AUC against whether the model's greedy decoding solves
    the problem, and ``prompt_auc_policy`` against whether ``policy`` does: ``policy_solved``
    (bool[len(problems)]; e.g. greedy over the legal steps, the policy-only rate of a search that
    enumerates them), by default the same greedy decoding. ``prompt`` lists each problem's prompt value
    and the policy's outcome.

    Returns ``{"depths": {d: summary}, "all": summary, "prompt_auc_greedy": float | None,
    "greedy_solve_rate": float, "walks": {"depths": ..., "all": ...} | None, ...}``; summaries as
    ``summarize`` gives them, those of ``walks`` (``walks`` random legal walks a problem; None for a
    task without them, or ``walks=0``) as ``summarize_vstar``. ``walks["states"]`` lists the walk states
    (problem index, text, depth, ``V*``, value): the states depend only on ``problems`` and ``key``, so
    two models' reports with the same ones can be compared state by state (``compare_walk_values``).
    """
    problems = list(problems)
    if policy_solved is not None:
        policy_solved = np.asarray(policy_solved, np.float64)
        if policy_solved.shape != (len(problems),):
            raise ValueError(f"policy_solved has shape {policy_solved.shape}; want one outcome per problem "
                             f"({len(problems)},)")
    graphdef, params = nnx.split(model)
    probe = ValueProbe(task, graphdef, seq_len=model.config.max_len, batch_size=batch_size)
    empty = [""] * len(problems)
    greedy_solved, _ = probe.rollouts(params, problems, empty, jax.random.fold_in(key, 0), samples=1, greedy=True)
    _, sampled = probe.rollouts(params, problems, empty, jax.random.fold_in(key, 1), samples=chains,
                                temperature=temperature)
    state_problem, state_text, state_depth = [], [], []
    for i, p in enumerate(problems):
        seen = set()
        for text in sampled[i]:
            for prefix, depth in chain_states(task, p, text):
                if prefix not in seen:
                    seen.add(prefix)
                    state_problem.append(i)
                    state_text.append(prefix)
                    state_depth.append(depth)
    live = ~probe.finished([problems[i] for i in state_problem], state_text)
    state_problem = [x for x, keep in zip(state_problem, live) if keep]
    state_text = [x for x, keep in zip(state_text, live) if keep]
    state_depth = [x for x, keep in zip(state_depth, live) if keep]
    sp = [problems[i] for i in state_problem]
    v = probe.values(params, sp, state_text)
    vstar = np.array([np.nan if (x := task.solvable_after(p, t)) is None else float(x)
                      for p, t in zip(sp, state_text)])
    mc_solved, _ = probe.rollouts(params, sp, state_text, jax.random.fold_in(key, 2), samples=mc_samples,
                                  temperature=temperature)
    mc = mc_solved.mean(axis=1)
    mass = probe.legal_mass(params, sp, state_text)
    depth = np.asarray(state_depth)
    report: dict[str, Any] = {
        "problems": len(problems), "chains_per_problem": chains, "mc_samples": mc_samples,
        "temperature": temperature, "greedy_solve_rate": float(greedy_solved.mean()),
        "depths": {int(d): {**summarize(v[depth == d], vstar[depth == d], mc[depth == d]),
                            "legal_mass": float(np.mean(mass[depth == d]))} for d in np.unique(depth)},
        "legal_mass": float(np.mean(mass)),
        "all": summarize(v, vstar, mc), "after_first_step": summarize(v[depth > 0], vstar[depth > 0], mc[depth > 0])}
    at_prompt = depth == 0
    prompt_values = np.zeros((len(problems),), np.float64)
    prompt_values[np.asarray(state_problem)[at_prompt]] = v[at_prompt]
    report["prompt_auc_greedy"] = auc(prompt_values, greedy_solved[:, 0])
    solved = greedy_solved[:, 0] if policy_solved is None else policy_solved
    report["prompt_auc_policy"] = auc(prompt_values, solved)
    report["prompt"] = {"policy": policy, "solve_rate": float(solved.mean()), "solved": solved.tolist(),
                        "value": [round(float(x), 6) for x in prompt_values]}
    report["walks"] = None
    w_index, w_text, w_depth = walk_states(task, problems, walk_rng(key), walks)
    if w_index:
        wp = [problems[i] for i in w_index]
        wv = probe.values(params, wp, w_text)
        wstar = np.array([float(task.solvable_after(p, t)) for p, t in zip(wp, w_text)])
        wd = np.asarray(w_depth)
        report["walks"] = {"walks_per_problem": walks,
                           "depths": {int(d): summarize_vstar(wv[wd == d], wstar[wd == d]) for d in np.unique(wd)},
                           "all": summarize_vstar(wv, wstar),
                           "states": {"problem": list(map(int, w_index)), "text": w_text, "depth": list(map(int, wd)),
                                      "vstar": wstar.tolist(), "value": [round(float(x), 6) for x in wv]}}
    return report


def depth_groups(depth: Sequence[int]) -> dict[str, np.ndarray]:
    """Masks (bool[n]) of the states to summarise: ``"all"``, and ``"<d>"`` for each depth ``d``."""
    depth = np.asarray(depth)
    return {"all": np.ones(len(depth), bool), **{str(int(d)): depth == d for d in np.unique(depth)}}


def walk_auc_intervals(walks: dict[str, Any], *, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``bootstrap_auc`` of one report's walk values against ``V*``: pooled (``"all"``) and per depth."""
    st = walks["states"]
    vstar, value, problem = (np.asarray(st[k]) for k in ("vstar", "value", "problem"))
    return {name: bootstrap_auc([value[m]], vstar[m], problem[m], resamples=resamples, seed=seed)
            for name, m in depth_groups(st["depth"]).items()}


def compare_walk_values(a: dict[str, Any], b: dict[str, Any], *, resamples: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of two value heads' walk AUCs against ``V*`` on the same states (``b`` minus ``a``).

    ``a``, ``b``: ``value_report`` results (or the JSON ``bench value`` writes) whose ``walks["states"]``
    are the same states. Pooled (``"all"``) and per depth, as ``bootstrap_auc`` gives them.
    """
    sa, sb = (r.get("walks") and r["walks"].get("states") for r in (a, b))
    if not sa or not sb:
        raise ValueError("both reports need the walk states (`walks.states`): rerun `alphareason bench value` "
                         "on each run with this version")
    if any(sa[k] != sb[k] for k in ("problem", "text", "depth")):
        raise ValueError("the two reports rank different walk states: run `bench value` on both with the same "
                         "--problems, split and seed")
    vstar, problem = np.asarray(sa["vstar"]), np.asarray(sa["problem"])
    va, vb = np.asarray(sa["value"]), np.asarray(sb["value"])
    return {name: bootstrap_auc([va[m], vb[m]], vstar[m], problem[m], resamples=resamples, seed=seed)
            for name, m in depth_groups(sa["depth"]).items()}


def constant_value(model):
    """A copy of ``model`` whose value head says 0.5 everywhere (zero weights and bias); the policy is the same.

    Search with it against search with ``model`` measures what the learned value adds.
    """
    copy = nnx.clone(model)
    copy.value_head[...] = jnp.zeros_like(copy.value_head[...])
    copy.value_bias[...] = jnp.zeros_like(copy.value_bias[...])
    return copy


def search_with_and_without_value(model, task: Task, problems: Sequence[Problem], key, *, env, search,
                                  batch_size: int = 100) -> dict[str, Any]:
    """MCTS solve rates on ``problems`` with the learned value and with a constant one (same policy, keys).

    Returns ``{"simulations", "problems", "learned", "constant", "difference", "paired": mcnemar}``.
    """
    from alphareason.eval.heldout import EvalSettings, Evaluator
    from alphareason.eval.stats import mcnemar
    settings = EvalSettings(strategy="mcts", batch_size=batch_size, env=env, search=search)
    solved = {name: np.array([r["solved"] for r in Evaluator(m, task, settings).run(list(problems), key)])
              for name, m in (("learned", model), ("constant", constant_value(model)))}
    return {"simulations": search.num_simulations, "problems": len(problems),
            "learned": float(solved["learned"].mean()), "constant": float(solved["constant"].mean()),
            "difference": float(solved["learned"].mean() - solved["constant"].mean()),
            "paired": mcnemar(solved["constant"], solved["learned"])}


def flat_metrics(report: dict[str, Any], prefix: str = "value_") -> dict[str, float]:
    """The headline numbers of a report as flat scalars (for ``metrics.jsonl`` / TensorBoard)."""
    out = {f"{prefix}prompt_auc_greedy": report["prompt_auc_greedy"], "policy_legal_mass": report["legal_mass"],
           f"{prefix}auc_vstar": report["after_first_step"].get("auc_vstar"),
           f"{prefix}auc_mc": report["all"]["auc_mc"], f"{prefix}brier_mc": report["all"]["brier_mc"],
           f"{prefix}ece_mc": report["all"]["ece_mc"]}
    if report["prompt"]["policy"] != "greedy":  # the policy-only rate is another policy's (legal steps)
        out[f"{prefix}prompt_auc_policy"] = report["prompt_auc_policy"]
    for d, row in report["depths"].items():
        out[f"{prefix}auc_vstar_depth{d}"] = row.get("auc_vstar")
    if report.get("walks"):
        out[f"{prefix}auc_vstar_walks"] = report["walks"]["all"].get("auc_vstar")
        for d, row in report["walks"]["depths"].items():
            out[f"{prefix}auc_vstar_walks_depth{d}"] = row.get("auc_vstar")
    return {k: (float("nan") if x is None else float(x)) for k, x in out.items()}
