"""Admission: choosing the account a new job runs on and taking one of its slots.

Runs inside the transaction that inserts the job, so a job exists if and only if it holds a slot.
"""

from __future__ import annotations

from random import Random

from sqlalchemy import Connection

from dreamserve.catalogue import Model
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import AccountNotFound, AtCapacity, BadRequest, NoAccountForModel
from dreamserve.storage import queries
from dreamserve.storage.queries import Account


class Admission:
    """Eligible accounts are the user's own and the shared ones that serve the model and are not
    in error; one with a free slot is chosen at random."""

    def __init__(self, engines: EngineRegistry, rng: Random, retry_after: int) -> None:
        self.engines = engines
        self.rng = rng
        self.retry_after = retry_after

    def serves(self, account: Account, model: Model) -> bool:
        """Whether an account can run a model: its own list, else all its engine supports."""
        if account.models is not None:
            return model.name in account.models
        if account.engine not in self.engines.names:
            return False
        engine = self.engines.engine(
            account.engine, account.settings, account_id=account.id, version=account.updated_at
        )
        return engine.serves(model)

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
        candidates = queries.usable_accounts(conn, user_id, account)
        if account is not None and not candidates:
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
        # Accounts full in this snapshot are skipped; the conditional UPDATE settles races.
        free = [each for each in healthy if each.running < each.cap(max_jobs)]
        self.rng.shuffle(free)
        for each in free:
            if queries.take_slot(conn, each.id, each.cap(max_jobs)):
                return each
        raise AtCapacity(account, self.retry_after)
