"""Scale-out, black box, as compose.yaml deploys it: the processes of its dreamserve services
(two API processes that run no jobs, and its worker, started twice), each with that service's
command and DREAMSERVE_*/AWS_* variables (tests/composefile.py), on one PostgreSQL and an S3
store (moto, on 127.0.0.1); only hosts, ports, paths, the bucket and the credentials are the
test's own. Jobs are submitted through either API and waited on through the other; a cancel
through one API stops the engine on the worker running the job; a worker SIGKILLed mid-job
(its first image stored, the second not) leaves its job to the other worker, with the
invariants of invariants.py; the images are objects of the store, served by either API, and the
killed try's object is referenced by nothing."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import psycopg
import pytest
from composefile import Local, Service, dreamserve_services, local_environment, read_compose
from invariants import database_is_sound, ended, never_twice_at_once, slots, webhooks_delivered
from objectstore import new_bucket, object_keys, objects, store_environment
from receiver import Receiver
from rig import ACCOUNT, Rig
from servers import DREAMSERVE_SERVE, Server
from support import free_port

from dreamserve.links import FILES_PATH

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

# The test's pace, over the compose file's settings: a killed worker's job is taken back within
# seconds.
PACE = {"DREAMSERVE_LEASE_SECONDS": "3", "DREAMSERVE_REAPER_INTERVAL_SECONDS": "0.2"}
READY = {"serve": "Uvicorn running on", "worker": "worker started: runs the jobs of"}
KEYS = {"secret.key", "secrets.key"}  # what the processes share through their data dirs


@dataclass
class Deployment:
    apis: list[Server]
    workers: list[Server]
    prefix: str  # of the blob store's keys in the bucket
    bucket: str
    endpoint: str

    def objects(self) -> dict[str, bytes]:
        """The store's objects under the prefix, by blob key."""
        found = objects(self.endpoint, self.bucket)
        return {key.removeprefix(self.prefix): data for key, data in found.items()}

    def blob_keys(self) -> set[str]:
        return {key.removeprefix(self.prefix) for key in object_keys(self.endpoint, self.bucket)}

    @property
    def data_dirs(self) -> set[Path]:
        return {server.data_dir for server in self.apis + self.workers}


@contextmanager
def deployed(rig: Rig, endpoint: str) -> Iterator[Deployment]:
    """compose.yaml's dreamserve processes on this machine: its API services in its order (the
    first started alone: it migrates and prints the token), then its worker service twice;
    each killed at the end."""
    services = dreamserve_services(read_compose())
    apis = [service for service in services if service.role == "serve"]
    workers = [service for service in services if service.role == "worker"]
    assert (len(apis), len(workers)) == (2, 1), [service.name for service in services]
    assert all(api.environment.get("DREAMSERVE_RUN_JOBS") == "false" for api in apis)
    blob_url = urlsplit(apis[0].environment["DREAMSERVE_BLOB_URL"])
    variables = store_environment(endpoint)
    assert rig.database_url is not None
    local = Local(
        database_url=rig.database_url,
        endpoint=endpoint,
        bucket=new_bucket(endpoint),
        access_key=variables["AWS_ACCESS_KEY_ID"],
        secret_key=variables["AWS_SECRET_ACCESS_KEY"],
        volumes=rig.root / "volumes",
        containers=rig.root / "containers",
    )
    prefix = blob_url.path.strip("/") + "/" if blob_url.path.strip("/") else ""
    deployment = Deployment([], [], prefix, local.bucket, endpoint)
    with ExitStack() as stack:

        def started(service: Service, instance: str, public_url: str | None = None) -> Server:
            port = free_port()
            public_url = public_url or f"http://127.0.0.1:{port}"
            environment = local_environment(service, local, instance, port, public_url)
            ours = rig.environment() | PACE
            assert not ours.keys() & environment.keys(), "the test would override compose.yaml"
            data_dir = Path(environment["DREAMSERVE_DATA_DIR"])
            command = (DREAMSERVE_SERVE[0], *service.command[1:])
            server = Server(data_dir, port, None, environment | ours, command, READY[service.role])
            stack.callback(_kill, server)
            rig.pids.append(server.process.pid)
            return server

        try:
            deployment.apis.append(started(apis[0], apis[0].name))
            rig.token = deployment.apis[0].token or ""
            assert rig.token, "the first start prints a token"
            deployment.apis.append(started(apis[1], apis[1].name))
            first = deployment.apis[0].url
            for n in (1, 2):
                worker = workers[0]
                deployment.workers.append(started(worker, f"{worker.name}-{n}", first))
            yield deployment
        except BaseException:
            for server in deployment.apis + deployment.workers:
                print(f"--- {server.process.args}:\n{server.output[-3000:]}")
            raise


def _kill(server: Server) -> None:
    if server.process.poll() is None:
        server.stop(signal.SIGKILL)


@contextmanager
def clients(rig: Rig, apis: list[Server]) -> Iterator[list[httpx.Client]]:
    headers = {"Authorization": f"Bearer {rig.token}"}
    with ExitStack() as stack:
        yield [
            stack.enter_context(httpx.Client(base_url=api.url, headers=headers, timeout=30))
            for api in apis
        ]


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    reply = client.post("/v1/dreamina/images", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["jobid"])


def test_the_compose_processes_share_the_jobs(
    pg_rig: Rig, receiver: Receiver, s3_endpoint: str
) -> None:
    rig = pg_rig
    with deployed(rig, s3_endpoint) as deployment, clients(rig, deployment.apis) as (one, two):
        # Submitted through each API, waited on (?wait=) through the other: the job runs on a
        # worker, whose changes wake the waiter through PostgreSQL's notifications.
        jobids = {
            "a": rig.submit(one, "a", receiver.url + "/a"),
            "b": rig.submit(two, "b", receiver.url + "/b"),
        }
        rig.open("a", "run", "store")
        rig.open("b", "run", "store")
        waited = two.get(f"/v1/dreamina/images/{jobids['a']}", params={"wait": 30})
        assert waited.json()["status"] == "completed", waited.text
        waited = one.get(f"/v1/dreamina/images/{jobids['b']}", params={"wait": 30})
        assert waited.json()["status"] == "completed", waited.text

        # Cancelled through the other API than it was submitted to: its engine, on a worker,
        # sees the cancel (the gated engine's wait ends: `end` is journalled).
        cancelled = rig.submit(two, "cancelled")
        rig.wait_journalled("cancelled", "start")
        reply = one.delete(f"/v1/dreamina/scheduler/{cancelled}")
        assert reply.status_code == 200, reply.text
        rig.wait_journalled("cancelled", "end")
        record = two.get(f"/v1/dreamina/images/{cancelled}").json()
        assert (record["status"], record["error"]) == ("failed", "Cancelled by user")

        # A worker killed mid-job, its first image in the store and its second being encoded:
        # the other worker runs the job again once its lease ran out.
        jobids["killed"] = submit(one, rig.body("killed") | {"count": 2})
        rig.wait_journalled("killed", "start")
        before = deployment.blob_keys()
        rig.open("killed", "run", "store0")
        rig.wait_for(lambda: len(deployment.blob_keys() - before) == 1, "image 0 stored")
        rig.wait_journalled("killed", "storing", 2)  # image 1 waits for its gate
        (stray,) = deployment.blob_keys() - before
        pid = next(line["pid"] for line in rig.journal() if line["tag"] == "killed")
        victim = next(worker for worker in deployment.workers if worker.process.pid == pid)
        victim.stop(signal.SIGKILL)
        rig.died(pid)
        rig.wait_journalled("killed", "start", 2)
        rig.open("killed", "store")
        records = ended(two, list(jobids.values()))
        assert all(record["status"] == "completed" for record in records.values()), records

        # Every image is an object of the store, served by either API process; the killed
        # try's object is still there, and nothing refers to it.
        stored = deployment.objects()
        uris = set()
        for record in records.values():
            for image in record["response"]["images"]:
                link = urlsplit(image["imageUrl"])
                uri = unquote(link.path.removeprefix(FILES_PATH))
                assert uri == image["imageUri"], image
                assert uri in stored, (uri, sorted(stored))
                uris.add(uri)
                for client in (one, two):
                    served = client.get(f"{link.path}?{link.query}")
                    assert served.status_code == 200, served.text
                    assert served.content == stored[uri]
        assert len(uris) == 4
        assert stray in stored
        assert stray not in uris
        with psycopg.connect(rig.database_url) as conn:
            assert (stray,) not in conn.execute("SELECT uri FROM assets").fetchall()

        assert slots(one) == {ACCOUNT: 0}  # the config declares accounts: no placeholder
        webhooks_delivered(two, receiver, {"a": jobids["a"], "b": jobids["b"]})
    assert never_twice_at_once(rig) == {"a": 1, "b": 1, "cancelled": 1, "killed": 2}
    database_is_sound(rig, stored=lambda uri: uri in stored)
    # The data dirs held the keys and nothing else: the database and the store hold the rest.
    assert all({path.name for path in data.iterdir()} == KEYS for data in deployment.data_dirs)
