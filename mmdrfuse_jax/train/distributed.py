"""Several processes training as one (`jax.distributed`), and what the run loop needs of them.

The same `bin/train.py` command runs on every process (one per host, or one per GPU); each one
is told the coordinator's address, the number of processes and its own id by flags
(`--coordinator_address`, `--num_processes`, `--process_id`), by the environment
(`JAX_COORDINATOR_ADDRESS`, read by JAX itself; `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, read
here), or by JAX's own detection of the cluster it runs in (SLURM, Open MPI, Cloud TPU). With
none of them, and no SLURM or Open MPI launch of more than one task, the run is one process as
it always was.

Once initialised, `jax.devices()` lists the devices of every process and the run's mesh spans
them all: every process holds the replicated train state, assembles only its own rows of each
global batch (`data.pipeline`), and runs the same jitted step, whose collectives cross the
processes (on a CPU through JAX's CPU collectives, gloo by default). The run loop then calls,
on every process at the same points: `barrier` where one process writes what the others read,
and `agree_on_stop` once per step, so that a SIGTERM to any one process stops all of them after
the same step. Files are written by process 0 (`is_primary`) alone; orbax checkpoints are
written by all of them together.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

import jax
import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError

MODES = ("auto", "on", "off")
# Read here (JAX itself reads JAX_COORDINATOR_ADDRESS, and detects SLURM, Open MPI and TPUs).
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


class DistributedError(MMDRFuseError, RuntimeError):
  """The processes cannot start or go on together (one-line message)."""


class UsageError(DistributedError):
  """Distributed settings that contradict each other or are not numbers (one-line message)."""


def _int_setting(value: int | str | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UsageError(f"{name} must be an integer, got {value!r}") from None


def _split_address(address: str, name: str) -> tuple[str, int]:
  """(host, port) of a `HOST:PORT` or `[IPV6]:PORT` address; UsageError naming `name` if not.

  JAX takes the port after the last colon without checking (no colon: an IndexError from
  inside it), and gRPC would retry a malformed address for minutes.
  """
  def bad(why: str) -> UsageError:
    return UsageError(f"{name} {address!r}: {why}")

  host, colon, port = address.rpartition(":")
  if not colon or not port:
    raise bad("not a HOST:PORT address (no port)")
  if not host:
    raise bad("not a HOST:PORT address (no host)")
  if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
    raise bad("not a HOST:PORT address (an IPv6 host is written [ADDRESS]:PORT)")
  if not port.isdigit():
    raise bad(f"the port {port!r} is not a number")
  if not 1 <= int(port) <= 65535:
    raise bad(f"the port {int(port)} is not in 1..65535")
  return host.removeprefix("[").removesuffix("]"), int(port)


def _address_name(coordinator_address: str | None) -> str:
  """How messages name where the coordinator's address came from."""
  return "--coordinator_address" if coordinator_address else f"${COORDINATOR_ENV}"


def _check_resolves(address: str, name: str) -> None:
  """Raises unless the host of `address` (a checked `HOST:PORT`) has an IP address.

  Raises:
    UsageError: no such host (a typo, say).
    DistributedError: the name service did not answer (a failure now, not a wrong setting).
  """
  host, port = _split_address(address, name)
  try:
    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    cause = str(e.strerror or e)
    # No such name (or one without an address) is a wrong setting; others, a failure now.
    unknown = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
    error = UsageError if e.errno in unknown else DistributedError
    raise error(f"{name} {address!r}: cannot resolve the host {host!r} "
                f"({cause[:1].lower() + cause[1:]})") from None


def launched_by_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """The launcher that started this process as one of several ("SLURM", "Open MPI"), or None.

  The same environment variables JAX's own detection reads; a launch of one task is not a
  distributed run (JAX would restrict a one-task SLURM job's GPUs to one).
  """
  env = os.environ if environ is None else environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(key in env for key in slurm) and (_int_setting(env["SLURM_NTASKS"], "SLURM_NTASKS")
                                           or 1) > 1:
    return "SLURM"
  if ("OMPI_MCA_orte_hnp_uri" in env
      and (_int_setting(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1):
    return "Open MPI"
  return None


def settings(mode: str = "auto", coordinator_address: str | None = None,
             num_processes: int | None = None, process_id: int | None = None,
             environ: Mapping[str, str] | None = None) -> dict | None:
  """The arguments of `jax.distributed.initialize` for these settings, or None: one process.

  Args:
    mode: "auto" (initialise when an address, count or id is given, by flag or environment, or
      when SLURM or Open MPI launched several tasks), "on" (always: JAX detects what is not
      given, on a Cloud TPU slice too) or "off" (one process, whatever is given).
    coordinator_address: `host:port` of process 0 (default: `JAX_COORDINATOR_ADDRESS`).
    num_processes: the number of processes (default: `JAX_NUM_PROCESSES`).
    process_id: this process's id, 0..num_processes-1 (default: `JAX_PROCESS_ID`).
    environ: the environment (default: `os.environ`).

  Raises:
    UsageError: an unknown mode, a count or id that is not a number or out of range, an
      address that is not `HOST:PORT`.
  """
  env = os.environ if environ is None else environ
  if mode not in MODES:
    raise UsageError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
  if mode == "off":
    return None
  address = coordinator_address or env.get(COORDINATOR_ENV) or None
  if address is not None:
    _split_address(address, _address_name(coordinator_address))
  count = (_int_setting(num_processes, "--num_processes") if num_processes is not None
           else _int_setting(env.get(NUM_PROCESSES_ENV), f"${NUM_PROCESSES_ENV}"))
  index = (_int_setting(process_id, "--process_id") if process_id is not None
           else _int_setting(env.get(PROCESS_ID_ENV), f"${PROCESS_ID_ENV}"))
  if count is not None and count < 1:
    raise UsageError(f"--num_processes must be at least 1, got {count}")
  if index is not None and (index < 0 or (count is not None and index >= count)):
    raise UsageError(f"--process_id must be in 0..{count - 1 if count else 'num_processes-1'}, "
                     f"got {index}")
  given = address is not None or count is not None or index is not None
  if mode == "auto" and not given and launched_by_cluster(env) is None:
    return None
  return dict(coordinator_address=address, num_processes=count, process_id=index)


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins this process to the others (`jax.distributed.initialize`) when `settings` says so.

  Call it before anything else uses jax. Returns whether the run is distributed.

  Raises:
    UsageError: unusable settings (see `settings`), a coordinator host that does not exist, or
      too few settings for JAX to start.
    DistributedError: the coordinator's host name could not be looked up now, or the processes
      could not connect (JAX waits up to 5 minutes for all of them).
  """
  kwargs = settings(mode, coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  if kwargs["coordinator_address"] is not None:
    # Before JAX: its client would retry an unknown host until its timeout (5 minutes).
    _check_resolves(kwargs["coordinator_address"], _address_name(coordinator_address))
  # On a CPU the cross-process collectives are JAX's CPU collectives: gloo by default since
  # jax 0.10 (`jax_cpu_collectives_implementation`, which may also name mpi).
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, TypeError) as e:  # Settings JAX could not complete from the cluster.
    raise UsageError(
        f"cannot start a distributed run ({_first_line(e)}): give --coordinator_address, "
        "--num_processes and --process_id, or run under SLURM, Open MPI or on a Cloud TPU "
        "slice") from None
  except Exception as e:  # Connection failures come as XlaRuntimeError and others.
    raise DistributedError(f"cannot start a distributed run with {kwargs}: "
                           f"{type(e).__name__}: {_first_line(e)}") from None
  return True


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0][:300]


def is_primary() -> bool:
  """Whether this is process 0, the one that logs and writes files (always, in a 1-process run)."""
  return jax.process_index() == 0


def describe() -> str:
  """'process 1 of 2' (for log lines), or '' in a 1-process run."""
  if jax.process_count() == 1:
    return ""
  return f"process {jax.process_index()} of {jax.process_count()}"


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (nothing in a 1-process run).

  Raises:
    DistributedError: another process has gone (its own log says why).
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  try:
    multihost_utils.sync_global_devices(name)
  except Exception as e:  # Gloo reports a peer that has gone as a ValueError, others otherwise.
    raise DistributedError(f"{describe()}: another process of the run has stopped ({name}: "
                           f"{_first_line(e)}); see its log") from None


def agree_on_stop(signum: int | None) -> int | None:
  """The signal that stops the run, the same on every process: any one's stop request stops all.

  Every process must call it at the same points (once per step): in a multi-process run it
  is a collective, a gather of one small integer per process.

  Args:
    signum: this process's stop request (`interrupts.StopRequest.signum`), or None.

  Returns:
    The lowest-numbered process's request among those that have one, or None when none has.

  Raises:
    DistributedError: another process has gone.
  """
  if jax.process_count() == 1:
    return signum
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  try:
    requests = multihost_utils.process_allgather(np.int32(signum or 0))
  except Exception as e:
    raise DistributedError(f"{describe()}: another process of the run has stopped "
                           f"({_first_line(e)}); see its log") from None
  asked = [int(r) for r in np.ravel(requests) if r]
  return asked[0] if asked else None


def local_rows(x: jax.Array | np.ndarray) -> np.ndarray:
  """This process's rows of `x`, an array split along its first axis, in their global order.

  All of `x` when this process holds all of it (a NumPy array, a 1-process run).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  shards: dict[int, jax.Shard] = {}
  for shard in x.addressable_shards:  # One per local device; replicas of a row hold equal data.
    shards.setdefault(shard.index[0].indices(x.shape[0])[0], shard)
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
