"""Devices: the mesh, where parameters and batches live on it, multi-process start-up.

One code path from one CPU to a pod, on JAX's own SPMD runtime. A
``jax.sharding.Mesh`` has two axes:

* ``data``: data parallelism, the usual way to add devices;
* ``fsdp``: fully sharded data parallelism: parameters and optimizer state
  are split along it (each device holds ``1/fsdp`` of them; XLA gathers a
  weight where it is used), and the batch is split along it as well.

Batches (SFT, learner, self-play and evaluation problems) are split over
both axes: ``data x fsdp`` devices each take an equal share of the rows.

Where a parameter lives is data, not code: the model annotates each
parameter with logical axis names (``model/transformer.py``: ``("embed",
"mlp")``, ``("vocab", "embed")``, ...) and ``RULES``, the one table here,
maps logical axes to mesh axes, as MaxText and the Flax examples do. The
jitted steps are the same functions whatever the mesh; only where their
inputs live changes, and XLA partitions the work. Both axes are
``AxisType.Auto``: with jax's explicit-axis meshes mctx's internal ``vmap``
fails on sharded batches. The search runs per shard (``per_shard``, a
``shard_map``): each device searches its own problems with a full copy of
the parameters, so its trees are the single-device trees (the same nodes,
visits and actions; values equal to float rounding, tested to 1e-6
relative).

Multi-process (several hosts, or several processes on one): every process
runs the same program. ``initialize_distributed`` starts JAX's distributed
runtime (from flags, from the environment, or on Cloud TPU / SLURM / Open MPI
by JAX's own detection). A host-side batch is the same on every process
(deterministic from the seed); each process feeds only its own rows to its
own devices (``shard_batch`` -> ``jax.make_array_from_process_local_data``),
and device results come back to every process whole (``to_host``), so the
bookkeeping on the hosts (replay, metrics) is identical everywhere. Only
process 0 writes logs and metrics (``is_main_process``); checkpoints are
written by all processes together (orbax).
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH = (DATA, FSDP)  # the mesh axes a batch's rows are split over

# Logical axis of a parameter -> mesh axis (None: not split). FSDP splits the
# model width; every other axis is kept whole (a tensor-parallel axis would
# split "mlp", "heads" and "vocab").
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("embed", FSDP),
    ("vocab", None),
    ("mlp", None),
    ("heads", None),
    ("head_dim", None),
    ("position", None),
    ("norm", None),
)

# Environment variables that describe a multi-process run when no flags do.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedError(RuntimeError):
    """A multi-process run that cannot start or go on; the message names the process and the fix."""


# ------------------------------------------------------------------ the mesh
def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with ``-1`` inferred from the device count.

    Raises ``ValueError`` naming the numbers when they cannot multiply to
    ``num_devices``.
    """
    for name, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if value == 0 or value < -1:
            raise ValueError(f"{name}={value}: give a positive size or -1 (inferred from the device count)")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: at most one can be inferred; set the other")
    if fsdp == -1 or data == -1:
        known = data if fsdp == -1 else fsdp
        if num_devices % known:
            name = "mesh.data" if fsdp == -1 else "mesh.fsdp"
            raise ValueError(f"{name}={known} does not divide the {num_devices} devices; choose a divisor of "
                             f"{num_devices}")
        data, fsdp = (known, num_devices // known) if fsdp == -1 else (num_devices // known, known)
    if data * fsdp != num_devices:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} but there are {num_devices} devices; "
                         f"make the product {num_devices} or set one of them to -1")
    return data, fsdp


def make_mesh(*, data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

    ``-1`` infers a size from the device count. Devices are ordered by
    process, so each process's devices hold a contiguous block of a batch's
    rows. Raises ``ValueError`` when the sizes do not fit the devices.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_shards(mesh: Mesh) -> int:
    """How many devices a batch's rows are split over (``data x fsdp``)."""
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def padded_rows(num_rows: int, mesh: Mesh | None) -> int:
    """``num_rows`` rounded up to a multiple of the mesh's batch devices (padding rows fill the rest)."""
    if mesh is None:
        return num_rows
    shards = batch_shards(mesh)
    return -(-num_rows // shards) * shards


def check_batch(batch_size: int, mesh: Mesh, *, name: str = "batch") -> None:
    """Raises ``ValueError`` when ``batch_size`` rows do not split evenly over the mesh."""
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(f"{name}={batch_size} is not divisible by the {shards} data-parallel devices "
                         f"(mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); use a multiple of {shards}")


def check_model(model_config, mesh: Mesh) -> None:
    """Raises ``ValueError`` when a parameter axis that ``RULES`` splits does not divide by its mesh axis."""
    rules = dict(RULES)
    sizes = {"embed": model_config.d_model, "vocab": model_config.vocab_size, "mlp": model_config.d_ff,
             "heads": model_config.num_heads, "head_dim": model_config.head_dim}
    field = {"embed": "model.d_model", "vocab": "the vocabulary", "mlp": "model.d_ff",
             "heads": "model.num_heads", "head_dim": "the head width"}
    for logical, size in sizes.items():
        axis = rules.get(logical)
        if axis is None:
            continue
        shards = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
        if size % shards:
            raise ValueError(f"{field[logical]}={size} cannot be split over the {shards} devices of mesh axis "
                             f"{axis!r} (FSDP); choose a mesh.fsdp that divides {size}")


# ------------------------------------------------------------- placement
def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The ``NamedSharding`` of every array of an ``nnx`` state, from its logical axes and ``RULES``.

    Arrays without an annotation (optimizer step counts, ...) are replicated.
    The optimizer's moments carry their parameter's annotation (flax copies
    it), so they are split as their parameter is.
    """
    from flax import nnx
    with nnx.logical_axis_rules(RULES):
        return nnx.get_named_sharding(state, mesh)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """One array in ``sharding``; host values must be equal on every process (each keeps its shards)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array: resharded by XLA
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_state(state: Any, mesh: Mesh) -> Any:
    """Places an ``nnx`` state (model, optimizer) on ``mesh`` by ``RULES`` (FSDP over ``fsdp``)."""
    return jax.tree.map(place, state, state_shardings(state, mesh))


def jit_state_step(step: Callable, state_sharding: Any = None) -> Callable:
    """``jax.jit`` of a learner step ``(state, batch) -> (state, metrics)`` that donates the old state.

    ``state_sharding`` (``state_shardings``) keeps the new state where the
    old one lived (FSDP) rather than where XLA's propagation would put it.
    """
    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, None))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over ``data x fsdp``; the other ``ndim - 1`` axes whole."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))) if ndim else P())


def process_rows(num_rows: int, mesh: Mesh) -> slice:
    """The rows of a ``num_rows``-row batch that this process's devices hold (a contiguous block)."""
    if jax.process_count() == 1:
        return slice(0, num_rows)
    check_batch(num_rows, mesh)
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((num_rows,))
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else num_rows) for s in index.values()})
    for (_, stop), (start, _) in zip(starts, starts[1:]):
        if stop != start:
            raise ValueError(f"process {jax.process_index()}'s devices hold non-contiguous rows {starts}; build "
                             f"the mesh with parallel.make_mesh (devices ordered by process)")
    return slice(starts[0][0], starts[-1][1])


def global_batch(local: Any, mesh: Mesh, num_rows: int) -> Any:
    """A global batch of ``num_rows`` rows from this process's rows (``process_rows``) of every array.

    Each process feeds only its own devices
    (``jax.make_array_from_process_local_data``). PRNG key arrays are
    accepted (their key data travels).
    """
    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        return jax.make_array_from_process_local_data(sharding, x, (num_rows,) + x.shape[1:])
    return jax.tree.map(put, local)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a host batch (the same on every process) with its rows split over the mesh.

    Each process transfers only its own rows; arrays already spread over
    several processes are resharded where they are.
    """
    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, batch_sharding(mesh, x.ndim))
        rows = x.shape[0]
        check_batch(rows, mesh)
        return global_batch(x[process_rows(rows, mesh)], mesh, rows)
    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` as a whole numpy array on every process (gathered across processes)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)


def per_shard(fn: Callable, mesh: Mesh, *, num_replicated: int = 1) -> Callable:
    """``fn(*replicated, *batched)`` run on each device for its own rows (a ``shard_map``).

    The first ``num_replicated`` arguments (the parameters) are gathered whole
    onto every device; the others and every output are split by rows over
    ``data x fsdp``. ``fn`` must treat rows independently (the search does:
    each problem is searched alone under ``vmap``), so each device computes
    what one device computes for those rows (up to float rounding: XLA may
    pick other kernels for a smaller batch).
    """
    def wrapped(*args):
        specs = tuple(P() for _ in args[:num_replicated]) + tuple(P(BATCH) for _ in args[num_replicated:])
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(BATCH), check_vma=False)(*args)
    return wrapped


# ---------------------------------------------------------- multi-process
def is_main_process() -> bool:
    """Process 0: the one that writes logs, metrics and files of its own."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches this point (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def main_first(name: str, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on process 0 first (e.g. building a dataset into a shared directory), then on the others."""
    result = fn() if is_main_process() else None
    sync(name)
    return result if is_main_process() else fn()


def distributed_settings(*, coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, environ=None) -> dict[str, Any] | None:
    """The multi-process settings from flags, else from the environment; None for a single process.

    Flags win over ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Incomplete or impossible settings raise
    ``DistributedError`` naming them.
    """
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_COORDINATOR)
    count = num_processes if num_processes is not None else _int_env(environ, ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _int_env(environ, ENV_PROCESS_ID)
    given = {"--coordinator-address": address, "--num-processes": count, "--process-id": pid}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"a multi-process run needs --coordinator-address, --num-processes and --process-id "
                               f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing "
                               f"{', '.join(missing)}")
    if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
        raise DistributedError(f"--coordinator-address={address!r} must be HOST:PORT (process 0's address and a "
                               f"free port), e.g. 10.0.0.1:1234")
    if count < 1:
        raise DistributedError(f"--num-processes={count} must be >= 1")
    if not 0 <= pid < count:
        raise DistributedError(f"--process-id={pid} is outside 0..{count - 1} for --num-processes={count}; give "
                               f"each process a distinct id below the process count")
    return {"coordinator_address": address, "num_processes": count, "process_id": pid}


def _int_env(environ, name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} must be an integer") from None


def cluster_detected() -> bool:
    """Whether JAX's own cluster detection recognises this environment (what ``jax.distributed.initialize()``
    with no arguments would use): a Cloud TPU VM (GCE or GKE), a SLURM job, an Open MPI launch, a
    Kubernetes job. Opt-in methods (mpi4py) are not tried."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # a JAX without the registry: only explicit settings start a multi-process run
        return False
    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def initialize_distributed(*, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout_seconds: int = 100,
                           fingerprint: str = "", auto: bool | None = None) -> int:
    """Starts JAX's multi-process runtime when flags or the environment ask for it; returns the process count.

    Call it first, before anything touches a device. With explicit settings
    (``distributed_settings``) every process connects to process 0's
    coordinator; on Cloud TPU pods, SLURM and Open MPI (``cluster_detected``,
    or ``auto=True``) JAX reads everything from the environment. Otherwise
    (one process) it does nothing.

    Then every process checks that the others agree: the process count and
    ``fingerprint`` (e.g. a hash of the run's config) are compared through
    the coordinator, and a process that disagrees stops every process with a
    ``DistributedError`` naming it, before any work starts. A process that
    dies later makes the others stop (JAX's heartbeat, after
    ``heartbeat_timeout_seconds``) with an error naming the lost process.
    """
    settings = distributed_settings(coordinator_address=coordinator_address, num_processes=num_processes,
                                    process_id=process_id)
    from jax._src import distributed as jax_distributed
    if jax_distributed.global_state.client is not None:  # already started (e.g. by a notebook)
        return jax.process_count()
    if settings is None and not (cluster_detected() if auto is None else auto):
        return 1
    kwargs = dict(settings or {})
    if settings is not None:
        kwargs["local_device_ids"] = None
        # If the coordinator runs fewer processes than this id, JAX itself stops this process
        # ("Unexpected task registered"): this line says what it was trying.
        print(f"alphareason: joining the run at {settings['coordinator_address']} as process "
              f"{settings['process_id']} of {settings['num_processes']}", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                                   initialization_timeout=max(60, heartbeat_timeout_seconds))
    except Exception as e:  # the runtime raises XlaRuntimeError/RuntimeError/ValueError
        where = settings["coordinator_address"] if settings else "the cluster environment"
        raise DistributedError(f"could not join the multi-process run at {where} as process "
                               f"{(settings or {}).get('process_id', '?')}: {' '.join(str(e).split())[:400]}. "
                               f"Check that every process got the same --coordinator-address and "
                               f"--num-processes, distinct --process-id values, and that process 0 is "
                               f"running") from e
    agree(num_processes=(settings or {}).get("num_processes", jax.process_count()), fingerprint=fingerprint)
    return jax.process_count()


def agree(*, num_processes: int, fingerprint: str = "", timeout_seconds: int = 120) -> None:
    """Every process publishes its process count and fingerprint and checks everyone else's.

    Raises ``DistributedError`` naming the first process that disagrees.
    """
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    me = jax.process_index()
    if client is None:
        return
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    client.key_value_set(f"alphareason/agree/{me}", f"{num_processes}|{digest}")
    problems = []
    if jax.process_count() != num_processes:
        problems.append(f"this process (id {me}) was started with --num-processes={num_processes} but the "
                        f"coordinator runs {jax.process_count()} processes")
    for other in range(jax.process_count()):
        try:
            value = client.blocking_key_value_get(f"alphareason/agree/{other}", timeout_seconds * 1000)
        except Exception as e:
            raise DistributedError(f"process {other} did not check in within {timeout_seconds}s "
                                   f"({' '.join(str(e).split())[:200]}); start every process of the run") from e
        count, their_digest = value.split("|")
        if int(count) != num_processes:
            problems.append(f"process {other} was started with --num-processes={count}, process {me} with "
                            f"{num_processes}")
        if their_digest != digest:
            problems.append(f"process {other} runs a different config than process {me}; start every process "
                            f"with the same config and overrides")
    if problems:
        raise DistributedError("; ".join(problems))


def fingerprint(obj: Any) -> str:
    """A stable text of ``obj`` (e.g. a config as a dict) for ``initialize_distributed``'s agreement check."""
    import json
    return json.dumps(obj, sort_keys=True, default=str)
