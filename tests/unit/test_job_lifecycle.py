"""The job lifecycle, driven at random: a Hypothesis state machine makes sequences of the job
store's transitions on a real database (SQLite and PostgreSQL) and checks, after every step, the
store against a model built from `jobs.TRANSITIONS` alone:

- a transition happens exactly when the table allows it from the job's phase (a runner's writes
  also need its own attempt to be the one running), so nothing leaves an ended state;
- every account's taken slots equal its unfinished jobs: a slot is taken once and given back once;
- every transition that happened is announced (inside the transaction) and published (after the
  commit) as its rule says, and nothing else is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Connection, delete, make_url, select

from dreamserve.events import JobEvents
from dreamserve.jobs import TRANSITIONS, Job, Phase, Spec, StoredImage, Transition
from dreamserve.settings import Settings
from dreamserve.storage import account_queries, job_queries, user_queries
from dreamserve.storage.database import Database, open_database
from dreamserve.storage.job_store import JobStore, JobTransaction
from dreamserve.storage.tables import SHARED, accounts, jobs, metadata

pytestmark = pytest.mark.both_databases

T = TypeVar("T")
LEASE = 1_000  # ms
MAX_ATTEMPTS = 2  # at recovery


class RecordingEvents(JobEvents):
    """Job events that also keep every announcement and publication, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[tuple[str, bool]] = []
        self.published: list[tuple[str, bool]] = []

    def announce(self, conn: Connection, jobids: Iterable[str], *, ended: bool) -> None:
        jobids = list(jobids)
        self.announced.extend((jobid, ended) for jobid in jobids)
        super().announce(conn, jobids, ended=ended)

    def publish(self, jobids: Iterable[str], *, ended: bool) -> None:
        jobids = list(jobids)
        self.published.extend((jobid, ended) for jobid in jobids)
        super().publish(jobids, ended=ended)


@dataclass
class Modelled:
    """What the model knows of one job."""

    id: int
    jobid: str
    account_id: int
    phase: Phase
    attempts: int = 0
    lease_until: int = 0
    finished_at: int | None = None


@pytest.fixture
def database(settings: Settings) -> Iterator[tuple[asyncio.AbstractEventLoop, Database]]:
    loop = asyncio.new_event_loop()
    url = make_url(settings.database)
    if url.get_backend_name() == "postgresql":
        # Its ~2,000 commits need not each wait for the disk (1-2 ms each here): the model is
        # checked against what the transactions see, not what survives a crash of PostgreSQL.
        url = url.update_query_dict({"options": "-c synchronous_commit=off"})
    db = open_database(url.render_as_string(hide_password=False))
    loop.run_until_complete(db.migrate())
    try:
        yield loop, db
    finally:
        loop.run_until_complete(db.close())
        loop.close()


def test_random_transition_sequences_keep_the_lifecycle_invariants(
    database: tuple[asyncio.AbstractEventLoop, Database],
) -> None:
    loop, db = database

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.events = RecordingEvents()
            self.store = JobStore(db, self.events)
            self.now = 1_000_000
            self.jobs: dict[int, Modelled] = {}
            self.accounts: list[int] = []
            self.serial = 0
            self.user = 0

        def run(self, awaitable: Any) -> Any:
            return loop.run_until_complete(awaitable)

        def write(self, change: Callable[[JobTransaction], T]) -> T:
            return self.run(self.store.write(change))  # type: ignore[no-any-return]

        def read(self, query: Callable[[Connection], T]) -> T:
            return self.run(db.read(query))  # type: ignore[no-any-return]

        @initialize()
        def fresh_tables(self) -> None:
            def empty(conn: Connection) -> tuple[int, list[int]]:
                for table in reversed(metadata.sorted_tables):
                    conn.execute(delete(table))
                user = user_queries.insert_user(conn, self.now)
                ids = [
                    account_queries.insert_account(
                        conn,
                        name=f"LOCAL:a{n}",
                        owner=SHARED,
                        email=f"a{n}",
                        region="LOCAL",
                        engine="procedural",
                        max_jobs=1000,
                        now=self.now,
                    )
                    for n in range(2)
                ]
                return user, ids

            self.user, self.accounts = self.run(db.write(empty))

        # -- what the model expects -------------------------------------------------------

        def expect(self, transition: Transition, job: Modelled, changed: bool) -> None:
            """The store did `transition` on `job` (or not): the model follows, and the events
            must say so exactly."""
            rule_ = TRANSITIONS[transition]
            if changed:
                assert rule_.allows(job.phase), f"{transition} happened from {job.phase}"
                assert rule_.target is not None
                job.phase = rule_.target
                if rule_.ends:
                    job.finished_at = self.now
            told = [(job.jobid, rule_.ends)] if changed and rule_.announced else []
            assert self.events.published == told
            assert self.events.announced == told
            self.events.published.clear()
            self.events.announced.clear()

        def runner_view(self, job: Modelled, stale: bool) -> Job:
            """The job as its runner holds it: the attempt it claimed (an earlier one if stale)."""
            stored = self.read(lambda conn: job_queries.job_by_id(conn, job.id))
            assert stored is not None
            return replace(stored, attempts=job.attempts - 1 if stale else job.attempts)

        def runs(self, job: Modelled, stale: bool) -> bool:
            return job.phase is Phase.RUNNING and not stale

        # -- the transitions --------------------------------------------------------------

        @rule(account=st.integers(0, 1))
        def admit(self, account: int) -> None:
            self.serial += 1
            jobid = f"job-{self.serial}"
            account_id = self.accounts[account]

            def admit(tx: JobTransaction) -> int:
                taken = account_queries.account_by_id(tx.conn, account_id)
                assert taken is not None
                assert account_queries.take_slot(tx.conn, taken)
                return tx.admit(
                    jobid=jobid,
                    kind="image",
                    user_id=self.user,
                    account_id=account_id,
                    account=f"LOCAL:a{account}",
                    model="seedream-4.0",
                    request={"prompt": "p"},
                    spec=Spec(width=8, height=8, count=1, prompt="p"),
                    forecast_cost=1,
                    created_at=self.now,
                    lease_until=self.now + LEASE,
                )

            job_id = self.write(admit)
            job = Modelled(job_id, jobid, account_id, Phase.QUEUED, lease_until=self.now + LEASE)
            self.jobs[job_id] = job
            assert TRANSITIONS[Transition.ADMIT].allows(None)
            assert not TRANSITIONS[Transition.ADMIT].announced
            assert self.events.published == []
            assert self.events.announced == []

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def claim(self, data: st.DataObject) -> None:
            job = self.pick(data)
            lease = self.now + LEASE
            claimed = self.write(lambda tx: tx.claim(job.id, self.now, lease))
            self.expect(Transition.CLAIM, job, claimed is not None)
            if claimed is not None:
                job.attempts += 1
                job.lease_until = lease
                assert claimed[0].attempts == job.attempts

        @precondition(lambda self: self.jobs)
        @rule(data=st.data(), stale=st.booleans(), percent=st.integers(0, 99))
        def progress(self, data: st.DataObject, stale: bool, percent: int) -> None:
            job = self.pick(data)
            if job.attempts == 0:
                return
            runner = self.runner_view(job, stale)
            lease = self.now + LEASE
            renewed = self.write(lambda tx: tx.progress(runner, lease, percent, self.now))
            assert renewed == self.runs(job, stale)
            self.expect(Transition.PROGRESS, job, renewed)
            if renewed:
                job.lease_until = lease

        @precondition(lambda self: self.jobs)
        @rule(data=st.data(), stale=st.booleans())
        def finish(self, data: st.DataObject, stale: bool) -> None:
            job = self.pick(data)
            if job.attempts == 0:
                return
            runner = self.runner_view(job, stale)
            image = StoredImage(f"i{job.id}", f"images/{job.id}.jpg", 8, 8, "jpeg", 10)
            finished = self.write(lambda tx: tx.finish(runner, [image], "p", self.now))
            assert finished == self.runs(job, stale)
            self.expect(Transition.FINISH, job, finished)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data(), stale=st.booleans())
        def fail(self, data: st.DataObject, stale: bool) -> None:
            job = self.pick(data)
            if job.attempts == 0:
                return
            runner = self.runner_view(job, stale)
            failed = self.write(lambda tx: tx.fail(runner, "Engine failed", None, self.now))
            assert failed == self.runs(job, stale)
            self.expect(Transition.FAIL, job, failed)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            job = self.pick(data)
            stored = self.read(lambda conn: job_queries.job_by_id(conn, job.id))
            assert stored is not None
            cancelled = self.write(lambda tx: tx.cancel(stored, "Cancelled by user", self.now))
            self.expect(Transition.CANCEL, job, cancelled)

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def requeue(self, data: st.DataObject) -> None:
            job = self.pick(data)
            lease = self.now + LEASE
            requeued = self.write(
                lambda tx: tx.requeue(job.id, job.jobid, job.attempts, self.now, lease)
            )
            assert requeued == (not job.phase.is_terminal and job.lease_until < self.now)
            self.expect(Transition.REQUEUE, job, requeued)
            if requeued:
                job.lease_until = lease

        @rule(milliseconds=st.sampled_from([1, LEASE // 2, LEASE + 1]))
        def time_passes(self, milliseconds: int) -> None:
            self.now += milliseconds

        @rule()
        def recover(self) -> None:
            lease = self.now + LEASE
            failed = self.write(lambda tx: tx.recover(MAX_ATTEMPTS, "Stopped", self.now, lease))
            told: list[tuple[str, bool]] = []
            for job in sorted(self.jobs.values(), key=lambda each: each.jobid):
                if job.phase.is_terminal:
                    continue
                if job.attempts >= MAX_ATTEMPTS:
                    assert TRANSITIONS[Transition.FAIL].allows(job.phase)
                    job.phase, job.finished_at = Phase.FAILED, self.now
                    told.append((job.jobid, True))
                else:
                    assert TRANSITIONS[Transition.REQUEUE].allows(job.phase)
                    job.phase, job.lease_until = Phase.QUEUED, lease
                    told.append((job.jobid, False))
            assert sorted(job.jobid for job in failed) == sorted(
                jobid for jobid, ended in told if ended
            )
            assert sorted(self.events.published) == sorted(told)
            assert sorted(self.events.announced) == sorted(told)
            self.events.published.clear()
            self.events.announced.clear()

        @rule(age=st.sampled_from([0, LEASE]))
        def expire(self, age: int) -> None:
            before = self.now - age
            gone = [
                job
                for job in self.jobs.values()
                if job.finished_at is not None and job.finished_at < before
            ]
            deleted, keys = self.write(lambda tx: tx.expire(before, 1000))
            assert deleted == len(gone)
            for job in gone:
                assert TRANSITIONS[Transition.EXPIRE].allows(job.phase)
                del self.jobs[job.id]
            assert self.events.published == []
            assert self.events.announced == []
            completed = [f"images/{job.id}.jpg" for job in gone if job.phase is Phase.COMPLETED]
            assert sorted(keys) == sorted(completed)

        def pick(self, data: st.DataObject) -> Modelled:
            return data.draw(st.sampled_from(sorted(self.jobs.values(), key=lambda j: j.id)))

        # -- after every step ---------------------------------------------------------------

        @invariant()
        def the_store_matches_the_model(self) -> None:
            """Every job's phase is the model's; every account's taken slots equal its
            unfinished jobs; no job the model does not know. One read, after every step."""

            def state(conn: Connection) -> tuple[list[Job | None], dict[int, int], list[int]]:
                stored = [job_queries.job_by_id(conn, job_id) for job_id in self.jobs]
                running = dict(conn.execute(select(accounts.c.id, accounts.c.running)).all())
                return stored, running, list(conn.execute(select(jobs.c.id)).scalars())

            stored, running, ids = self.read(state)
            assert {job.id: job.phase for job in stored if job is not None} == {
                job.id: job.phase for job in self.jobs.values()
            }
            if not self.accounts:  # before the first step: the tables are not this run's yet
                return
            unfinished = {account: 0 for account in self.accounts}
            for job in self.jobs.values():
                if not job.phase.is_terminal:
                    unfinished[job.account_id] += 1
            assert running == unfinished
            assert sorted(ids) == sorted(self.jobs)

    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=100,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
