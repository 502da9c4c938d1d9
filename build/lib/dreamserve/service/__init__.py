"""The façade the API, the CLI and the tests all call: one part per resource, each built once by
the composition root (`app.open_server`) and handed in.

- `tokens`: who a request is; new tokens; the first start's user.
- `submissions`: image and upscale jobs validated, admitted and dispatched; the catalogue.
- `records`: job records, now, once ended (`?wait=`) or at each change (event stream).
- `scheduler`: the jobs holding slots, cancelling one, resuming a database's jobs at start.
- `accounts`: own and shared accounts.
- `assets`: uploads, generated images, the files behind signed links.
- `webhooks`: signing secrets, deliveries, redelivery.

A part never reaches into another's state; where two need the same rule (which account a user
may see) it is a function of the part that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamserve.service.accounts import Accounts
from dreamserve.service.assets import Assets
from dreamserve.service.config import ServiceConfig
from dreamserve.service.records import Record, Records, Submitted
from dreamserve.service.scheduler import AnotherRunner, Scheduler
from dreamserve.service.submissions import Submissions
from dreamserve.service.tokens import DEFAULT_ACCOUNT, Tokens
from dreamserve.webhooks.outbox import Webhooks

__all__ = [
    "DEFAULT_ACCOUNT",
    "AnotherRunner",
    "Record",
    "Service",
    "ServiceConfig",
    "Submitted",
]


@dataclass(frozen=True)
class Service:
    tokens: Tokens
    submissions: Submissions
    records: Records
    scheduler: Scheduler
    accounts: Accounts
    assets: Assets
    webhooks: Webhooks
    config: ServiceConfig
