"""Devices: the mesh, how batches and parameters are placed on it, multi-host start-up.

One code path from one CPU to a pod. A ``jax.sharding.Mesh`` has two axes:

* ``data``: the self-play batch (problems searched at once) and the training
  batch are split along it;
* ``fsdp``: parameters may be split along it (size 1 by default: the tiny
  models here are replicated).

Both axes are ``AxisType.Auto``: with jax's explicit-axis meshes mctx's
internal ``vmap`` fails on sharded batches. Sharding is data, not branches:
the jitted search and learner step are the same functions whatever the mesh;
only where their inputs live changes, and XLA partitions the work.

Multi-host: call ``initialize_distributed()`` first on every host (it wraps
``jax.distributed.initialize``, which reads the cluster from the environment
on Cloud TPU, SLURM and similar; it is a no-op on a single process).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"


def initialize_distributed() -> None:
    """Starts multi-host JAX when the environment describes a cluster; no-op otherwise."""
    if any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                                       "TPU_WORKER_HOSTNAMES")) and jax.process_count() == 1:
        jax.distributed.initialize()


def make_mesh(*, data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``data`` defaults to the rest.

    Raises ``ValueError`` naming the numbers when they do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {n} devices; choose a divisor of {n}")
    data = n // fsdp if data is None else data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} but there are {n} devices")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def check_batch(batch_size: int, mesh: Mesh, *, name: str = "batch") -> None:
    """Raises ``ValueError`` when ``batch_size`` does not split evenly over the data axis."""
    shards = mesh.shape[DATA]
    if batch_size % shards:
        raise ValueError(f"{name}={batch_size} is not divisible by the {shards} data-parallel devices; "
                         f"use a multiple of {shards}")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` with its leading (batch) axis split over ``data``."""
    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        spec = P(DATA, *([None] * (x.ndim - 1))) if x.ndim else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a full copy of every array of ``tree`` on every device (parameters, optimizer state)."""
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)
