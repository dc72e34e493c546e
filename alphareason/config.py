"""Experiment configs: Python files under ``configs/`` with ``get_config()``.

``load_config("configs/countdown_tiny.py", ["train.steps=200"])`` loads the
file, applies ``key=value`` overrides (the command line's
``--config.train.steps=200``) and checks the result. Unknown keys are refused
with the list of valid ones; values are parsed as Python literals and must
keep the type of the default.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


# Sections of every config:
#   task      which task and its options (passed to ``alphareason.tasks.get_task``)
#   data      dataset sizes, seed and demonstration kind (TFDS, array_record)
#   model     the transformer (``alphareason.model.ModelConfig``)
#   train     supervised warm start (SFT): optimizer, steps, logging, checkpoints
#   eval      held-out evaluation after training / every iteration
#   search    mctx search over reasoning steps
#   selfplay  the AlphaZero loop: iterations, episodes, replay, learner
#   grpo      selfplay.algorithm=grpo: RL on the verifier's reward without search (alphareason/train/grpo.py)
#   mesh      the device mesh every phase runs on (``alphareason.parallel``)


def default_config() -> ConfigDict:
    """Defaults shared by every experiment config (see the module docstring of configs/*)."""
    c = ConfigDict()
    c.name = "base"
    c.seed = 0

    c.task = ConfigDict()
    c.task.name = "countdown"
    c.task.options = ConfigDict(
        {"num_numbers": 4, "max_number": 99, "min_target": 10, "max_target": 100,
         "use_all": True, "tool": "calculator"})

    c.data = ConfigDict()
    c.data.train_size = 20_000
    c.data.validation_size = 200
    c.data.test_size = 200
    c.data.sft_task_options = ConfigDict()  # task options of the SFT demonstrations only (transfer settings)
    c.data.seed = 0  # the problems (splits, demonstrations); ``seed`` is everything else (init, order, self-play)
    c.data.demonstrations = "solutions"  # or "traces" (Stream of Search)
    c.data.negatives_per_problem = 0.5
    # The value head's SFT label per state: "chain" (the chain's outcome at every state) or "oracle" (each
    # state's exact solvability from the task's solver; an oracle, refused for tasks without one).
    c.data.value_label = "chain"
    c.data.data_dir = ""  # default: <workdir>/data
    c.data.exclude_file = ""  # JSONL of problems never to train on

    c.model = ConfigDict()
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.model.positions = "rope"
    c.model.compute_dtype = "float32"  # "bfloat16": bf16 matmul inputs, f32 accumulation/params
    c.model.max_len = 0  # 0: derived from the task's prompt and step sizes

    c.train = ConfigDict()
    c.train.steps = 2000
    c.train.batch_size = 64
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.grad_clip = 1.0
    c.train.policy_weight = 1.0
    c.train.value_weight = 0.5
    c.train.imitate_unsolved = False  # traces: imitate unsolved search traces too (Stream of Search)
    c.train.log_every = 50
    c.train.checkpoint_every = 500

    c.eval = ConfigDict()
    c.eval.num_problems = 100  # the first problems of the validation split, evaluated after SFT and every iteration
    c.eval.batch_size = 100
    c.eval.test_problems = 0  # > 0: also greedy on the test split every iteration, per-problem results kept
    c.eval.value_problems = 100  # value diagnostics (eval.value) on states from this many validation problems
    c.eval.value_mc_samples = 4  # Monte-Carlo rollouts per state for those diagnostics

    c.search = ConfigDict()
    c.search.policy = "gumbel"  # or "puct"
    c.search.num_simulations = 16
    c.search.num_candidates = 8
    c.search.candidate_temperature = 1.0
    c.search.candidates = "sample"  # or "enumerate" (task's legal-step generator)
    c.search.distinct_candidates = True  # sampled: K distinct steps, drawn without replacement
    c.search.group_rows = 32  # candidate rows per batched model call of an expansion (row groups)
    c.search.max_tree_gib = 4.0  # the most memory one device's search trees (KV caches included) may hold
    c.search.length_normalize = False
    c.search.max_num_considered_actions = 8
    c.search.gumbel_scale = 1.0
    c.search.value_scale = 0.1  # Gumbel: weight of the completed Q-values (mctx's default)
    c.search.rescale_values = True  # Gumbel: min-max normalise them over the root's children (mctx's default)
    c.search.pb_c_init = 1.25
    c.search.dirichlet_alpha = 0.3
    c.search.dirichlet_fraction = 0.25
    c.search.max_depth = 0  # 0: no limit; else mctx's depth limit (>= the task's minimum steps)

    c.selfplay = ConfigDict()
    c.selfplay.algorithm = "alphazero"  # "alphazero" | "expert_iteration" | "sft_only"
    c.selfplay.iterations = 4
    c.selfplay.episodes_per_iteration = 256
    c.selfplay.actor_batch_size = 64
    c.selfplay.replay_capacity = 8192
    c.selfplay.learner_steps = 100
    c.selfplay.learner_batch_size = 64
    c.selfplay.learning_rate = 5e-4
    c.selfplay.policy_weight = 1.0
    c.selfplay.value_weight = 1.0
    c.selfplay.sft_weight = 0.0
    # Where alphazero's SFT term (sft_weight > 0) gets its chains: "solved" self-play episodes, or
    # "demonstrations", the SFT data (an anchor to the demonstrator, as AlphaStar's supervised loss or
    # InstructGPT's pretraining mix). Expert iteration always imitates its solved episodes.
    c.selfplay.sft_source = "solved"
    c.selfplay.value_target = "outcome"  # "outcome" | "search_q" | "td_lambda" | "proven"
    # > 0 (enumerated candidates): the learner also fits the value, at this weight, to the states of the
    # search trees that the trees proved solvable or unsolvable (replay.proven_tree_nodes), off the played path
    c.selfplay.tree_value_weight = 0.0
    c.selfplay.value_lambda = 0.8  # td_lambda: weight of the longer returns (1: the outcome, 0: the next search value)
    # "softmax": CE between action_weights and the softmax of the K candidates' log-likelihoods;
    # "likelihood": -sum_k action_weights[k] * log p(candidate k) (the sequences' own probabilities).
    c.selfplay.policy_target = "softmax"
    # "softmax" with K distinct sampled candidates: the network's logits over them carry the same correction as
    # the search's prior (minus log P(drawn)), so the fixed point of the distillation is the improved policy
    # itself and not it divided by the candidates' inclusion probabilities (Sampled MuZero, Hubert et al. 2021).
    c.selfplay.sampled_set_correction = True
    # The moves the policy term learns from: "all", or "solved" (only those of episodes the verifier accepted;
    # elsewhere the target ranks candidates by the value's guesses alone). The value term uses every move.
    c.selfplay.policy_moves = "all"
    c.selfplay.eval_simulations = 16
    c.selfplay.action_temperature = 1.0  # moves sampled from the search policy (0: argmax)
    c.selfplay.curriculum = False  # easy problems first, by the task's difficulty levels

    # GRPO (selfplay.algorithm="grpo"): each iteration samples group_size chains for each of
    # selfplay.episodes_per_iteration problems (selfplay.actor_batch_size problems at a time) and learns in
    # minibatches of selfplay.learner_batch_size chains. The action space follows search.candidates:
    # "sample" = free generation of steps, "enumerate" = a policy over the task's legal steps.
    c.grpo = ConfigDict()
    c.grpo.group_size = 8  # G chains per problem (Tunix: num_generations)
    c.grpo.clip_eps = 0.2  # the ratio is clipped to [1 - eps, 1 + eps] (Tunix: epsilon)
    c.grpo.updates_per_batch = 1  # minibatch epochs over each rollout batch (Tunix: num_iterations, mu)
    c.grpo.kl_beta = 0.0  # weight of the k3 KL to a frozen reference policy (Tunix: beta); 0: none
    c.grpo.reference = ""  # the reference: a run directory's newest checkpoint; "": this run's SFT checkpoint
    c.grpo.dr_grpo = False  # Dr. GRPO: advantages r - mean (no std), no length normalisation (Tunix: done_right)
    c.grpo.temperature = 1.0  # rollout sampling temperature (the policy whose ratio is clipped)
    c.grpo.token_budget = 0  # > 0: each iteration's problems (up to episodes_per_iteration) are played until
    # rollouts + learner (as computed) reach this many token forwards: compute-matched comparisons
    c.grpo.format_reward = 0.0  # an unsolved chain earns this x its fraction of valid steps; 0: verifier only
    # The device mesh of every phase (SFT, self-play, learner, evaluation, strategies): batches are split
    # over data x fsdp devices, parameters and optimizer state over fsdp (docs/scaling.md). -1: inferred
    # from the device count (all processes together). The default is plain data parallelism.
    c.mesh = ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c


class ConfigError(ValueError):
    """A config the project cannot run; the message names the key and the fix."""


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
    path = os.fspath(path)
    if not os.path.exists(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
        known = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
        raise ConfigError(f"config file {path} does not exist; available in configs/: {', '.join(known)}")
    # A config may build on another (``from configs.countdown_tiny import get_config``):
    # make the folder that holds ``configs/`` importable while the file runs.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location(f"alphareason_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(root)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    config = module.get_config()
    apply_overrides(config, overrides)
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare strings: --config.search.policy=puct


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    for item in overrides:
        item = item[len("--config."):] if item.startswith("--config.") else item
        item = item[len("config."):] if item.startswith("config.") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.steps=200)")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "config"
                valid = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r}; "
                                  f"valid keys there: {', '.join(valid)}")
            if depth < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        value = _parse_value(raw)
        if isinstance(old, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and not isinstance(old, ConfigDict) and type(value) is not type(old):
            if not (isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
                raise ConfigError(f"config key {key!r} is a {type(old).__name__} (default {old!r}); "
                                  f"got {raw!r}")
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[parts[-1]] = value
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Dict-valued keys whose contents are free (task options), stored and restored whole.
WHOLE_DICTS = ("task.options", "data.sft_task_options")
# Keys that older versions of the project wrote into a run's config.json and that no code reads any more.
REMOVED_KEYS = ("search.action_temperature", "eval.split", "eval.temperature", "eval.samples")
# Keys added since whose default is not the old behaviour: a stored config without them gets this value.
ADDED_KEYS_OLD_VALUES = {"search.distinct_candidates": False}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and (prefix + k) not in WHOLE_DICTS:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def upgrade_config(stored: dict, *, where: str = "config.json") -> ConfigDict:
    """A run's stored config on top of today's defaults: the one upgrade path for old run directories.

    Keys a stored config lacks (added since the run was made) take their
    defaults, which reproduce the behaviour before they existed, or, where
    today's default changed the behaviour, the old value
    (``ADDED_KEYS_OLD_VALUES``); keys in ``REMOVED_KEYS`` are dropped. Any
    other key today's code does not know is refused, naming it.
    """
    config = default_config()
    unknown = []
    for key, value in _flatten(stored).items():
        if key in REMOVED_KEYS:
            continue
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            node = node[part] if isinstance(node, ConfigDict) and part in node else None
            if node is None:
                break
        if node is None or parts[-1] not in node:
            unknown.append(key)
            continue
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[parts[-1]] = ConfigDict(value) if isinstance(value, dict) else value
    stored_keys = _flatten(stored)
    for key, value in ADDED_KEYS_OLD_VALUES.items():
        if key not in stored_keys:
            section, name = key.rsplit(".", 1)
            config[section][name] = value
    if unknown:
        raise ConfigError(f"{where} has keys this version of alphareason does not know: {', '.join(unknown)}; "
                          f"it was written by another version. Use that version, or retrain in a new --workdir")
    return config


def stored_config_json(path: str) -> dict:
    """The config stored at ``path`` (a run's ``config.json``), upgraded to today's keys, as plain JSON values.

    The form in which two runs' configs are compared: ``ConfigDict.to_dict`` through a JSON round trip,
    so tuples and lists, and values JSON cannot hold (written with ``str``), compare equal."""
    with open(path) as f:
        return config_json(upgrade_config(json.load(f), where=path))


def config_json(config: ConfigDict) -> dict:
    """``config`` as the plain JSON values a run's ``config.json`` holds (see ``stored_config_json``)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def run_config(workdir: str) -> ConfigDict:
    """The config a training run in ``workdir`` was made with (its ``config.json``)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{workdir} has no config.json: it is not a training run directory. Train first with "
                          f"`alphareason train --config configs/countdown_tiny.py --workdir {workdir}`")
    with open(path) as f:
        return upgrade_config(json.load(f), where=path)
