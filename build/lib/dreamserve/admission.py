"""Admission: choosing the account a new job runs on and taking one of its slots.

Runs inside the transaction that inserts the job, so a job exists if and only if it holds a slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random

from sqlalchemy import Connection

from dreamserve.catalogue import Model
from dreamserve.engines.base import Engine
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import (
    AccountNotFound,
    AtCapacity,
    BadRequest,
    EngineUnavailable,
    NoAccountForModel,
    UserLimitReached,
)
from dreamserve.storage import account_queries, job_queries, user_queries
from dreamserve.storage.account_queries import Account

log = logging.getLogger(__name__)


class Admission:
    """Eligible accounts are the user's own and the shared ones that serve the model and are not
    in error; one with a free slot is chosen at random among those of the highest priority
    that has one, an account cooling down only when no other has one (a job that names an
    account goes to it, cooling or not).

    Each user's list of accounts is remembered for `cache_seconds`: reading it cost more than
    the rest of a submission (docs/benchmarks.md), and so are, with it, the accounts of that
    list that can take each model (asking each account's engine). Staleness is safe: the slot
    is taken by a statement that checks the account's cap and health as they are now, so a
    stale list can only offer an account that then refuses (deleted, in error, full) or miss a
    new one for a moment. `forget()` drops the lists at once (after this process changes an
    account).
    """

    def __init__(
        self,
        engines: EngineRegistry,
        rng: Random,
        retry_after: int,
        *,
        cache_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.engines = engines
        self.rng = rng
        self.retry_after = retry_after
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.wall = wall  # epoch ms, for cooldowns
        self._accounts: dict[int, _Usable] = {}
        # Checked by Submissions before `admit`/`enqueue`, in the same transaction.
        self.limits = UserLimits(self, retry_after, wall=wall)

    def forget(self) -> None:
        self._accounts.clear()

    def _usable(self, conn: Connection, user_id: int, *, fresh: bool = False) -> _Usable:
        now = self.clock()
        cached = self._accounts.get(user_id)
        if fresh or cached is None or cached.until <= now:
            accounts = account_queries.usable_accounts(conn, user_id)
            limits = user_queries.limits_of(conn, user_id)
            cached = _Usable(now + self.cache_seconds, accounts, limits)
            if len(self._accounts) >= 10_000:
                self._accounts.clear()
            self._accounts[user_id] = cached
        return cached

    def serves(self, account: Account, model: Model) -> bool:
        """Whether an account can run a model: one offered in its region, on its own list,
        else all its engine supports."""
        if account.engine not in self.engines.names:  # configured for another server
            return False
        if not model.offered_in(account.region):
            return False
        if account.models is not None:
            return model.name in account.models
        engine = self.usable_engine(account)
        return engine is not None and engine.serves(model)

    def usable_engine(self, account: Account) -> Engine | None:
        """The account's engine, or None when this server cannot build it: an engine it does
        not have, or secrets it cannot open (secrets.key lost or replaced)."""
        if account.engine not in self.engines.names:
            return None
        try:
            return self.engines.for_account(account)
        except (ValueError, EngineUnavailable):
            log.exception("account %s cannot be used", account.name)
            return None

    def admit(
        self,
        conn: Connection,
        *,
        user_id: int,
        model: Model,
        account: str | None,
        max_jobs: int | None,
    ) -> Account:
        """Take a slot and return its account, or raise the error the client gets."""
        try:
            return self._admit(conn, user_id, model, account, max_jobs)
        except AtCapacity:
            if account is None:
                raise
            # A named account that refused may be gone or changed since the list was read
            # (deleted, put in error): read it again, once, so the client gets the right error.
            return self._admit(conn, user_id, model, account, max_jobs, fresh=True)

    def _admit(
        self,
        conn: Connection,
        user_id: int,
        model: Model,
        account: str | None,
        max_jobs: int | None,
        *,
        fresh: bool = False,
    ) -> Account:
        healthy = self._candidates(conn, user_id, model, account, fresh=fresh)
        if len(healthy) > 1:
            healthy = list(healthy)
            self.rng.shuffle(healthy)
            # Accounts cooling down last, then the highest priority first; the sort is stable,
            # so the order within a tier stays random: a lower tier is tried only when every
            # account above it refused (full), a cooling one only when every other did.
            now = self.wall()
            healthy.sort(key=lambda each: (each.cooling(now), -each.priority))
        for each in healthy:
            if account_queries.take_slot(conn, each, max_jobs):
                return each
        raise AtCapacity(account, self.retry_after)

    def enqueue(
        self,
        conn: Connection,
        *,
        user_id: int,
        model: Model,
        account: str | None,
        limit: int,
    ) -> Account:
        """The account whose queue a job that found no free slot joins (`queueSeconds`): of the
        accounts it may go to (the named one, or every eligible one), the one with the fewest
        jobs waiting, at random among ties; AtCapacity when every such queue holds `limit`."""
        healthy = self._candidates(conn, user_id, model, account)
        waiting = job_queries.waiting_counts(conn, [each.id for each in healthy])
        room = [each for each in healthy if waiting[each.id] < limit]
        if not room:
            raise AtCapacity(account, self.retry_after)
        self.rng.shuffle(room)
        return min(room, key=lambda each: waiting[each.id])  # the first of the fewest

    def _candidates(
        self,
        conn: Connection,
        user_id: int,
        model: Model,
        account: str | None,
        *,
        fresh: bool = False,
    ) -> list[Account]:
        """`_healthy` of the user's cached list, kept with it."""
        usable = self._usable(conn, user_id, fresh=fresh)
        healthy = usable.healthy.get((model.name, account))
        if healthy is None:
            healthy = usable.healthy[model.name, account] = self._healthy(usable, model, account)
        return healthy

    def _healthy(self, usable: _Usable, model: Model, account: str | None) -> list[Account]:
        """The accounts of the list (only the one named `account`, if given) that serve the
        model and are not in error; or the error the client gets when there are none."""
        candidates = usable.accounts
        if account is not None:
            candidates = [each for each in candidates if each.name == account]
            if not candidates:
                raise AccountNotFound(account)
        serving = [each for each in candidates if self.serves(each, model)]
        if not serving:
            if account is not None:
                raise BadRequest(f"Account {account} does not serve model {model.name}")
            raise NoAccountForModel(model.name)
        healthy = [each for each in serving if each.error is None]
        if not healthy:  # accounts in error serve nothing until fixed: retrying will not help
            if account is not None:
                raise BadRequest(f"Account {account} is in error: {serving[0].error}")
            raise NoAccountForModel(model.name)
        return healthy


@dataclass
class _Usable:
    """A user's accounts and limits (max running, max per minute) as read at one time, valid
    `until`, and for each (model, named account or None) the accounts among them that can take
    it."""

    until: float
    accounts: list[Account]
    limits: tuple[int | None, int | None]
    healthy: dict[tuple[str, str | None], list[Account]] = field(default_factory=dict)


class UserLimits:
    """The limits an operator set on a user (`dreamserve users set`), checked in the transaction
    that admits the job, before a slot is taken: `max_running` unfinished jobs at once (those
    running, queued for a runner or waiting in an account's queue for a slot), `max_per_minute`
    submissions per minute (counted per minute of the clock: a fixed window).

    Each user's limits are read and remembered with their accounts (`Admission`'s cache, for
    `cache_seconds`), so that a user without limits costs no statement. A user with limits
    costs one UPDATE that counts the submission (or, without `max_per_minute`, a row lock on
    PostgreSQL), and with `max_running` one count of their unfinished jobs: the UPDATE holds
    the user's row until the transaction commits, so two submissions of one user are admitted
    one after the other and never both take the last unit, on PostgreSQL as on SQLite (whose
    writes take turns)."""

    def __init__(self, admission: Admission, retry_after: int, *, wall: Callable[[], int]) -> None:
        self.admission = admission
        self.retry_after = retry_after
        self.wall = wall  # epoch ms: the minute of a submission

    def forget(self) -> None:
        self.admission.forget()

    def check(self, conn: Connection, user_id: int) -> None:
        """Count the submission, or raise UserLimitReached (the transaction then rolls back,
        the submission uncounted)."""
        max_running, max_per_minute = self.admission._usable(conn, user_id).limits
        if max_running is None and max_per_minute is None:
            return
        if max_per_minute is not None:
            wall = self.wall()
            minute = wall - wall % 60_000
            if not user_queries.take_submission(conn, user_id, minute, max_per_minute):
                retry_after = max(1, -(-(minute + 60_000 - wall) // 1000))
                raise UserLimitReached(
                    f"{max_per_minute} submissions per minute", "max-per-minute", retry_after
                )
        else:
            user_queries.lock_user(conn, user_id)
        if max_running is not None and user_queries.count_running(conn, user_id) >= max_running:
            jobs = "running job" if max_running == 1 else "running jobs"
            raise UserLimitReached(f"{max_running} {jobs}", "max-running", self.retry_after)
