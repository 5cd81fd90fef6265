"""One GPU shared by the runs on its machine: a Prefect global concurrency slot around training.

A scheduled retrain and an ad-hoc run that start together would both load a model onto the
GPU and one would fail out of memory. Runs that train hold a slot of a global concurrency
limit (`--gpu-slot`, default `tnflow-gpu`, created with one slot if missing) while they train
and validate, so the second waits, and says for whom, instead of failing.

The slot is a Prefect lease: a run killed while holding it frees it when the lease runs out
(`LEASE_SECONDS` without renewal), so nobody has to reset anything by hand. Prefect does not
say who holds a lease, so the holder names itself in a Prefect variable beside the limit;
that is only for the message.

Without a Prefect server (no PREFECT_API_URL) each process runs its own temporary one and
the slot only orders the runs inside that process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.variables import Variable

NO_SLOT = "none"
LEASE_SECONDS = 300  # a killed holder's slot is free again after this long


def holder_variable(name: str) -> str:
    return f"{name}-holder"


def ensure_limit(name: str) -> GlobalConcurrencyLimitResponse:
    """The limit as it is now; created with one slot if it does not exist (a user's own stays)."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        return client.read_global_concurrency_limit_by_name(name)


def current_holder(name: str) -> str:
    """Who last took the slot, as "run 'NAME' (ID)", for the waiting message."""
    value = Variable.get(holder_variable(name), default=None)
    if not isinstance(value, dict):
        return "another run"
    return f"run {value.get('run_name')!r} ({value.get('run_id')})"


@contextmanager
def gpu_slot(name: str, log: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    """Hold one slot of the limit `name` (`NO_SLOT`: none) for the duration of the block."""
    if name == NO_SLOT:
        yield
        return
    limit = ensure_limit(name)
    slots = limit.limit
    if limit.active_slots >= slots:
        log.info(
            "waiting for a GPU slot held by %s (concurrency limit %r, %d slot%s; a killed run's slot frees "
            "itself within %d s)",
            current_holder(name),
            name,
            slots,
            "" if slots == 1 else "s",
            LEASE_SECONDS,
        )
    run_id = flow_run.id
    holder = ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None
    with concurrency(name, occupy=1, lease_duration=LEASE_SECONDS, strict=True, holder=holder):
        me = {"run_id": run_id, "run_name": flow_run.name, "since": datetime.now(UTC).isoformat()}
        Variable.set(holder_variable(name), me, overwrite=True)
        log.info("holding the GPU slot %r (released after validation)", name)
        try:
            yield
        finally:
            if (Variable.get(holder_variable(name), default=None) or {}).get("run_id") == run_id:
                Variable.unset(holder_variable(name))
