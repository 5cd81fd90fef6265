"""A GPU of its own for every run on a machine, and no run, however it dies, keeps it.

A scheduled retrain and an ad-hoc run that start together would both load a model onto one
GPU and one would fail out of memory. Runs that train hold a GPU slot while they train and
validate, so a run waits, and says for whom, instead of failing. A slot is two locks:

- On this host, a file lock per GPU (`tasks.core.host_slots`; per slot on a host without
  GPUs): the run trains and validates on the GPU whose lock it holds, which no other tnflow
  run on the host holds, whatever Prefect backend it reports to: the GPU is the machine's.
  A run of N towers (`--gpus N`) holds N locks, taken all at once or not at all, and N slots
  of the limit as one lease. The kernel releases the lock when its process dies, whatever
  kills it, so a killed run never keeps its GPU.
- On the Prefect server, one slot of the global concurrency limit `--gpu-slot` (created with
  a slot per GPU of the host, or one without GPUs, if missing; a user's own limit stays): the
  UI counts it, and runs of other hosts on the same server take turns. It is a lease renewed
  from a background thread, so neither a slow nor a lost server stalls training.

The holder writes its lease, tagged with its backend, into its lock file and clears it when
it lets go. A lease of this backend still written there when the next run takes the lock is
a dead run's: its process was killed, and its lease died with a temporary server's memory,
or with a restarted server. That slot is released, with a warning. (A lease of another
backend is carried on, for a run of that backend to give back.) A dead holder on another
host is freed by its lease expiring (`LEASE_SECONDS`), which needs the server to keep its
leases (README: leases that survive a restart)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_HOME

from tnflow.tasks.core.digests import short_digest
from tnflow.tasks.core.errors import TnflowError, first_line
from tnflow.tasks.core.files import describe_holder, wait_for, whoami
from tnflow.tasks.core.host_slots import Journal, Log, host_slot, lock_dir
from tnflow.tasks.core.processes import best_effort, in_background

NO_SLOT = "none"
LEASE_SECONDS = 300  # a holder on another host that died frees its slot after this long
RENEW_SECONDS = LEASE_SECONDS / 4
GONE = 410  # the server no longer knows a lease
PENDING = "pending"  # in the journal while the server is asked for a slot
LOCKED = 423  # every slot of the limit is taken


def backend() -> str:
    """Which Prefect database counts the slots: a server's URL, or the home of temporary servers."""
    from tnflow.tasks.core.prefect_server import is_temporary

    url = PREFECT_API_URL.value()
    return url if url and not is_temporary(url) else f"temporary servers of {PREFECT_HOME.value()}"


def ensure_limit(name: str, slots: int = 1) -> GlobalConcurrencyLimitResponse:
    """The limit as it is now; created with `slots` slots if it does not exist (a user's own stays)."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        return client.read_global_concurrency_limit_by_name(name)


@contextmanager
def gpu_slot(name: str, log: Log, gpus: Sequence[str] = (), count: int = 1) -> Iterator[tuple[int, ...]]:
    """Hold `count` slots of the limit `name` (`NO_SLOT`: none) for the duration of the block.

    `gpus`: the GPUs TensorFlow sees on this host. The limit is created with one slot per GPU,
    and the run holds `count` GPUs that no other tnflow run on this host holds (their lock
    files); the block gets their indices in `gpus` (none without GPUs, or without a slot).
    """
    if name == NO_SLOT:
        yield ()
        return
    limit = ensure_limit(name, max(len(gpus), 1))
    if count > limit.limit:
        raise TnflowError(
            f"--gpus {count} needs {count} slots of the concurrency limit {name!r}, which has {limit.limit}: "
            f"raise it (`prefect gcl update {name} --limit {count}`) or pass --gpu-slot none"
        )
    me = {**whoami(), "since": datetime.now(UTC).isoformat()}
    paths = lock_paths(name, len(gpus), limit.limit)
    key = short_digest(backend(), 8)  # the server's slots are one Prefect database's
    waiting = _waiting(name, len(paths), "that run's training and validation end, or at once if its process dies")
    with host_slot(paths, me, log, waiting, count, mine=lambda entry: _tagged(entry)[0] in (key, "")) as journals:
        lease = _server_slot(name, limit.limit, me, journals, count, log, key)
        renewer = _Renewer(lease, log)
        held = tuple(paths.index(journal.path) for journal in journals) if gpus else ()
        named = f", and {_named(held, gpus)}" if held else ""
        if gpus:
            log.info("holding the GPU slot %r%s (released after validation)", name, named)
        else:  # the slot still keeps concurrent runs from sharing this machine's cores and memory
            log.info("holding the slot %r: no GPU here, one training at a time (released after validation)", name)
        try:
            yield held
        finally:
            renewer.stop()
            if best_effort(lambda: _release(lease), 5.0, "tnflow-gpu-slot-release"):
                journals[0].write(None)
            # else the lease stays in the journal, and the next run on this host gives it back


def lock_paths(name: str, gpus: int, slots: int) -> list[Path]:
    """The host's lock files: one per GPU, named for the GPU alone (every run on the machine meets there,
    whatever its slot name or Prefect backend); without GPUs, one per slot of the limit `name`."""
    if gpus:
        return [lock_dir() / f"gpu-{i}.lock" for i in range(gpus)]
    return [lock_dir() / f"{name}-{i}.lock" for i in range(slots)]


def _tagged(entry: str) -> tuple[str, str]:
    """An owed entry's backend key and what is owed ('' for an untagged entry, taken as this backend's)."""
    tag, sep, owed = entry.partition(":")
    return (tag, owed) if sep else ("", entry)


def gpu_count(option: str, visible: int) -> int:
    """How many GPUs `--gpus` asks of a machine with `visible` GPUs: one tower per GPU, or one on the CPU."""
    if option == "all":
        return max(visible, 1)
    count = int(option)
    if count > max(visible, 1):
        seen = f"{visible} GPU{'s' if visible != 1 else ''}" if visible else "no GPU"
        fits = max(visible, 1)
        raise TnflowError(f"--gpus {count}: TensorFlow sees {seen} on this machine; pass --gpus {fits} or all")
    return count


def _named(held: tuple[int, ...], gpus: Sequence[str]) -> str:
    return ", ".join(f"GPU {i} ({gpus[i]})" for i in held)


def _waiting(name: str, slots: int, frees: str) -> str:
    """The waiting line, with `{holders}` and `{waited}` to fill in."""
    plural = "" if slots == 1 else "s"
    return (
        f"waiting for a GPU slot held by {{holders}} (concurrency limit {name!r}, {slots} slot{plural}; "
        f"waited {{waited:.0f}} s): it frees when {frees}"
    )


# -- the server's slot --------------------------------------------------------------------


def _server_slot(
    name: str, slots: int, me: dict[str, Any], journals: list[Journal], count: int, log: Log, key: str
) -> UUID:
    """Take `count` slots of the Prefect limit as one lease; first free those a dead run on this host left behind.

    The first journal records the lease (as `key:lease*count` for several slots, `key` naming
    the backend); the others' leftovers move into its count of slots that may still be taken,
    and they are emptied.
    """
    holder = ConcurrencyLeaseHolder(type="flow_run", id=me["run_id"]) if me["run_id"] else None
    # Slots a dead holder may still count that the server knows no lease for: taken back only
    # if they block this run, and kept in the journal until then (a kill here loses none).
    left = [(_tagged(entry)[1], record) for journal in journals for entry, record in journal.owed]
    gone = sum(_release_dead(name, entry, record, log) for entry, record in left)
    journal, others = journals[0], journals[1:]
    waiting = _waiting(
        name,
        slots,
        f"that run's training and validation end, or within {LEASE_SECONDS} s of its process dying "
        f"(`prefect gcl inspect {name}` shows the count)",
    )

    def take() -> UUID | None:
        nonlocal gone
        while True:
            with get_client(sync_client=True) as client:
                journal.write([f"{key}:{PENDING}"] * (gone + count))  # a kill while the server answers leaves a trace
                for other in others:
                    other.write(None)  # what it owed is counted in the first journal now
                lease = _try_increment(client, name, holder, count)
                if lease is None and gone:
                    client.release_concurrency_slots([name], 1, occupancy_seconds=1.0)
                    gone -= 1
                    continue
            if lease is None:
                journal.write([f"{key}:{PENDING}"] * gone)
            return lease

    def report(waited: float) -> None:
        log.info(waiting.format(holders=_server_holder(name), waited=waited))

    lease = wait_for(take, report, poll=2.0)
    journal.write([f"{key}:{lease}" if count == 1 else f"{key}:{lease}*{count}"])
    with contextlib.suppress(Exception):  # only for other runs' waiting messages
        _set_holder(name, me)
    return lease


def _try_increment(client: Any, name: str, holder: ConcurrencyLeaseHolder | None, count: int) -> UUID | None:
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=count, mode="concurrency", lease_duration=LEASE_SECONDS, holder=holder
        )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == LOCKED:
            return None
        raise
    return UUID(response.json()["lease_id"])


def _release_dead(name: str, entry: str, record: dict[str, Any], log: Log) -> int:
    """Release a dead holder's lease; how many of its slots may still count (the server knows no lease for them)."""
    log.warning(
        "%s did not give back the GPU slot %r (killed, or cut off from its server): releasing it now",
        describe_holder(record),
        name,
    )
    if entry == PENDING:  # killed while asking for it: whether the server counted it is unknown
        return 1
    lease, _, slots = entry.partition("*")
    with get_client(sync_client=True) as client:
        try:
            # The shortest renewal tells whether the lease still exists without keeping it alive.
            client.renew_concurrency_lease(UUID(lease), lease_duration=60)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != GONE:
                raise
            return int(slots or 1)
        client.release_concurrency_slots_with_lease(UUID(lease))
    return 0


def _release(lease: UUID) -> None:
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease)


def _holder_variable(name: str) -> str:
    return f"{name.lower()}-holder"


def _set_holder(name: str, me: dict[str, Any]) -> None:
    from prefect.variables import Variable

    Variable.set(_holder_variable(name), me, overwrite=True)


def _server_holder(name: str) -> str:
    """Who last took the server's slot, for runs that wait for a run on another host."""
    from prefect.variables import Variable

    with contextlib.suppress(Exception):
        value = Variable.get(_holder_variable(name), default=None)
        if isinstance(value, dict):
            return describe_holder(value)
    return "another run"


class _Renewer:
    """Renews the lease from its own thread: the training step never waits on the server."""

    def __init__(self, lease: UUID, log: Log):
        self.lease, self.log, self.stopped = lease, log, threading.Event()
        in_background(self._run, "tnflow-gpu-slot-lease")

    def _run(self) -> None:
        warned = False
        while not self.stopped.wait(RENEW_SECONDS):
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(self.lease, lease_duration=LEASE_SECONDS)
            except Exception as exc:  # noqa: BLE001 - the host lock still guards the GPU; say so once
                if not warned:
                    warned = True
                    self.log.warning(
                        "could not renew the GPU slot's lease on the Prefect server (%s); training goes on, "
                        "this host's lock still guards the GPU",
                        first_line(exc),
                    )

    def stop(self) -> None:
        self.stopped.set()
