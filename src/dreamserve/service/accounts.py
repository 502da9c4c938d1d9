"""Accounts: a user's own and the shared ones, saved through their engine's settings, listed,
described and deleted (their unfinished jobs cancelled)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from dreamserve import observe
from dreamserve.accounts import check_models, models_served, parse_account, summary
from dreamserve.admission import Admission
from dreamserve.catalogue import Catalogue
from dreamserve.dispatch.base import Dispatcher
from dreamserve.errors import (
    AccountNotFound,
    BadRequest,
    NotFound,
    OperatorOnlyEngine,
    SharedAccount,
)
from dreamserve.ids import is_account_id, unquoted
from dreamserve.jobs import CANCELLED_BY_USER, EndedJob, millis
from dreamserve.replies import AccountDeleted, AccountSummary
from dreamserve.storage import account_queries, user_queries
from dreamserve.storage.account_queries import Account
from dreamserve.storage.database import Database
from dreamserve.storage.job_store import JobStore, JobTransaction
from dreamserve.storage.tables import SHARED

# For each account id, its jobs that ended in the last hour by outcome.
Outcomes = dict[int, dict[str, int]]


class Accounts:
    def __init__(
        self,
        *,
        db: Database,
        catalogue: Catalogue,
        admission: Admission,
        dispatcher: Dispatcher,
        store: JobStore,
        clock: Callable[[], datetime],
    ) -> None:
        self.db = db
        self.catalogue = catalogue
        self.admission = admission
        self.dispatcher = dispatcher
        self.store = store
        self.clock = clock

    async def put(self, user_id: int | None, fields: Mapping[str, Any]) -> AccountSummary:
        """Create or replace (upsert) an account of a user, or a shared one when `user_id` is
        None (the operator, through the CLI); its summary. Saving an account clears its error.
        """
        spec = parse_account(fields, self.catalogue, self.admission.engines)
        if user_id is not None and self.admission.engines.operator_only(spec.engine):
            raise OperatorOnlyEngine(spec.engine)
        probe = self.admission.engines.probe(spec.engine, spec.settings, spec.sealed)
        try:
            check_models(spec, probe, self.catalogue)
            # A user's upstream on an address the server refuses (engines/upstream.py): a 400
            # now rather than a failure in every job. The operator's shared accounts may.
            check_address = getattr(probe, "check_address", None)
            if user_id is not None and check_address is not None:
                await check_address()
        finally:
            await probe.close()
        owner = SHARED if user_id is None else user_id
        now = millis(self.clock())

        def put(conn: Connection) -> tuple[Account, Outcomes]:
            if user_id is not None:
                require_user(conn, user_id)
            others = [
                each for each in account_queries.owners_of_name(conn, spec.name) if each != owner
            ]
            if owner != SHARED and SHARED in others:
                raise SharedAccount(spec.name)
            if owner == SHARED and others:
                raise BadRequest(
                    f"Account {spec.name} already exists as an account of user {others[0]}"
                )
            values: dict[str, Any] = {
                "email": spec.email,
                "region": spec.region,
                "engine": spec.engine,
                "max_jobs": spec.max_jobs,
                "priority": spec.priority,
                "now": now,
                "settings": spec.settings,
                "sealed": spec.sealed,
                "models": spec.models,
            }
            existing = account_queries.account_named(conn, owner, spec.name)
            if existing is None:
                account_queries.insert_account(conn, name=spec.name, owner=owner, **values)
            else:
                account_queries.update_account(conn, existing.id, **values)
            saved = account_queries.account_named(conn, owner, spec.name)
            assert saved is not None
            return saved, self._outcomes(conn, [saved])

        try:
            account, outcomes = await self.db.write(put)
        except IntegrityError:  # the same new account saved at once by another request
            account, outcomes = await self.db.write(put)
        self.admission.forget()
        # A cap raised (or an error cleared): jobs waiting in its queue take the new room now.
        await self.store.write(lambda tx: tx.promote(account.id, now))
        return self._summary(account, outcomes)

    async def listing(self, user_id: int | None) -> dict[str, AccountSummary]:
        """The accounts a user may use (own and shared), or the shared ones for None."""

        def read(conn: Connection) -> tuple[list[Account], Outcomes]:
            if user_id is None:
                found = account_queries.shared_accounts(conn)
            else:
                require_user(conn, user_id)
                found = account_queries.usable_accounts(conn, user_id)
            return found, self._outcomes(conn, found)

        found, outcomes = await self.db.read(read)
        return {account.name: self._summary(account, outcomes) for account in found}

    async def get(self, user_id: int | None, name: str) -> AccountSummary:
        """One account the user may use, with what its engine says of itself (`details`);
        AccountNotFound otherwise."""
        name = unquoted(name)

        def read(conn: Connection) -> tuple[Account, Outcomes]:
            account = visible(conn, user_id, name)
            return account, self._outcomes(conn, [account])

        account, outcomes = await self.db.read(read)
        body = self._summary(account, outcomes)
        describe = getattr(self.admission.usable_engine(account), "describe", None)
        if describe is not None:
            body["details"] = describe()
        return body

    async def usable(self, user_id: int, name: str) -> Account:
        """The account called `name` that the user may use; AccountNotFound otherwise."""
        name = unquoted(name)
        return await self.db.read(lambda conn: visible(conn, user_id, name))

    async def delete(self, user_id: int | None, name: str) -> AccountDeleted:
        """Delete a user's own account (a shared one for None) and cancel its unfinished jobs."""
        name = unquoted(name)
        now = millis(self.clock())

        def remove(tx: JobTransaction) -> tuple[int, list[EndedJob], int]:
            conn = tx.conn
            account = visible(conn, user_id, name)
            if user_id is not None and account.is_shared:
                raise SharedAccount(name)
            cancelled = tx.cancel_account(
                account.id, CANCELLED_BY_USER, f"Account {name} was deleted", now
            )
            account_queries.delete_account(conn, account.id)
            if user_id is None:
                return account.id, cancelled, len(account_queries.shared_accounts(conn))
            return account.id, cancelled, len(account_queries.usable_accounts(conn, user_id))

        account_id, cancelled, remaining = await self.store.write(remove)
        self.admission.forget()
        self.admission.engines.retire(account_id)
        for job in cancelled:
            observe.job_cancelled(job, reason=f"Account {name} was deleted")
            self.dispatcher.cancel(job.id)
        return {"account": name, "deleted": True, "remaining": remaining}

    async def routing(self) -> list[str]:
        """One line per catalogue model: the shared accounts that serve it (where a job that
        names no account may go), and how many users' own accounts do; printed at every start
        so that an operator sees the routing before the first job."""
        everyone = await self.db.read(account_queries.every_account)
        lines = []
        for model in self.catalogue.models:
            serving = [each for each in everyone if self.admission.serves(each, model)]
            shared = [each.name for each in serving if each.is_shared]
            owned = len(serving) - len(shared)
            served = ", ".join(shared) if shared else "no shared account"
            if owned:
                served += f" and {owned} user account{'s' if owned > 1 else ''}"
            lines.append(f"model {model.name}: {served}")
        return lines

    def _outcomes(self, conn: Connection, found: list[Account]) -> Outcomes:
        since = millis(self.clock()) - 3_600_000
        return account_queries.recent_outcomes(conn, since, [account.id for account in found])

    def _summary(self, account: Account, outcomes: Outcomes) -> AccountSummary:
        now = millis(self.clock())
        engine = self.admission.usable_engine(account)
        if engine is None:  # an engine this server lacks, or secrets it cannot open
            models = list(account.models or ())
        else:
            models = models_served(engine, account.models, self.catalogue, account.region)
        return summary(account, models, now, outcomes.get(account.id))


def require_user(conn: Connection, user_id: int) -> None:
    """API callers exist (they hold a token); the CLI names users by number, and an account's
    owner is no foreign key: an account left to a mistyped user would go to a later one."""
    if not user_queries.user_exists(conn, user_id):
        raise NotFound(f"User {user_id} not found")


def visible(conn: Connection, user_id: int | None, name: str) -> Account:
    """The account called `name` that the user may use (their own first, then a shared one),
    or the shared one for None; AccountNotFound otherwise."""
    if not is_account_id(name):  # no query for what cannot be an account id
        raise AccountNotFound(name)
    owners = [SHARED] if user_id is None else [user_id, SHARED]
    for owner in owners:
        account = account_queries.account_named(conn, owner, name)
        if account is not None:
            return account
    raise AccountNotFound(name)
