"""Orbax checkpoints: one directory per step, written atomically.

A checkpoint holds named items, each a pytree of arrays saved with
``StandardSave`` (``state``: the model and optimizer as pure dicts; the
self-play loop adds ``replay``), plus ``meta``: a JSON dict
(step, data position, phase, ...). Any subset of the items can be restored,
so loading a model for evaluation does not read the replay buffer.

Orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save (or a full disk) leaves the previous checkpoint intact;
half-written temporaries are cleaned up when the manager is next opened.

Sharded and multi-process: arrays are saved where they live (no gathering
to one host): every process writes the shards it holds, and all processes
call ``save`` together (host-side numpy items, such as the replay buffer, are
the same on every process and written by process 0). A restore reads into
the shardings of the tree it is given, whatever mesh wrote the checkpoint:
a checkpoint of an 8-device ``(4, 2)`` mesh restores on one device or on a
``(2, 4)`` mesh. Before reading, every array's shape is compared with the
checkpoint's, so a checkpoint of another model config is refused with the
names of the parameters that differ.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def snapshot(state) -> dict:
    """An ``nnx.split`` state (e.g. of ``(model, optimizer)``) as a pure dict of arrays, for orbax."""
    from flax import nnx
    return nnx.to_pure_dict(state)


def restore_into(state, pure: dict):
    """Writes a pure dict (``snapshot``'s format) back into an ``nnx`` state; returns the state."""
    from flax import nnx
    nnx.replace_by_pure_dict(state, pure)
    return state


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read; the message says where and what to do."""


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with clear errors."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], **items: Any) -> None:
        """Saves ``state`` (and extra named ``items``) synchronously; returns once complete."""
        trees = {"state": state, **items}
        args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores item ``state`` of ``step`` (default: the latest) into ``abstract_state``'s structure.

        Arrays come back with the shardings of ``abstract_state``'s arrays
        (``jax.Array`` leaves or ``ShapeDtypeStruct`` with a sharding).
        """
        items, meta = self.restore_items({"state": abstract_state}, step)
        return items["state"], meta

    def restore_items(self, abstract_items: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict]:
        """Restores the named items (a subset of those saved) and the metadata.

        An item saved at a size only the checkpoint knows (a buffer that keeps
        the rows it held) is given as a function of its ``saved_shapes``
        (None where unreadable) returning the structure to restore into.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(
                f"no checkpoint found in {self.directory}; train first "
                f"(`alphareason train --workdir ...`) or point --workdir at a run that has one")
        saved = {name: self.saved_shapes(name, step) for name in abstract_items}
        targets = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree(saved[name]) if callable(tree) else tree)
                   for name, tree in abstract_items.items()}
        for name, target in targets.items():
            self.check_shapes(name, target, step, saved[name])
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: "
                f"{str(e)[:300]}). It may be corrupt or from an incompatible config: delete "
                f"{os.path.join(self.directory, str(step))} to fall back to an earlier step, or use a new "
                f"--workdir") from e
        return {name: restored[name] for name in abstract_items}, dict(restored["meta"])

    def saved_shapes(self, item: str, step: int) -> dict[str, tuple[int, ...]] | None:
        """``{"path.to.array": shape}`` of every array of ``item`` in checkpoint ``step`` (None: unreadable)."""
        import logging
        directory = os.path.join(self.directory, str(step), item)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # orbax warns that the per-item metadata file is absent
        try:
            tree = ocp.StandardCheckpointer().metadata(directory).item_metadata
        except Exception:  # an old or foreign layout: leave the judgement to the restore itself
            return None
        finally:
            absl_logger.setLevel(level)
        shapes = {_path_name(path): tuple(leaf.shape)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}
        return shapes or None  # nothing readable (e.g. corrupt metadata): the restore will say so

    def check_shapes(self, item: str, target: Any, step: int, saved: dict[str, tuple[int, ...]] | None) -> None:
        """Raises ``CheckpointError`` naming the arrays whose shapes (or presence) differ from ``target``'s.

        ``saved`` is ``saved_shapes(item, step)`` (None: unreadable, left to the restore to judge).
        """
        if saved is None:
            return
        wanted = {_path_name(path): tuple(leaf.shape)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0] if hasattr(leaf, "shape")}
        differ = [f"{k} is {saved[k]} there and {wanted[k]} in the config" for k in sorted(wanted)
                  if k in saved and saved[k] != wanted[k]]
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        if not (differ or missing or extra):
            return
        parts = []
        if differ:
            parts.append(f"{len(differ)} array(s) differ in shape: " + "; ".join(differ[:4])
                         + (f"; and {len(differ) - 4} more" if len(differ) > 4 else ""))
        if missing:
            parts.append(f"the config has {len(missing)} array(s) the checkpoint lacks: {', '.join(missing[:4])}")
        if extra:
            parts.append(f"the checkpoint has {len(extra)} array(s) the config lacks: {', '.join(extra[:4])}")
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} does not fit the config ({item}): " + ". ".join(parts)
            + ". It was written with a different model (or replay) config: run with that config, or use a "
              "new --workdir")

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"metadata of checkpoint step {step} in {self.directory} cannot be read: {e}") from e
        return dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()


def _path_name(path) -> str:
    """A key path as ``0.blocks.1.mlp.up`` (orbax's metadata spells dict keys of ints as strings)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
