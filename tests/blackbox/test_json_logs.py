"""The real server with `DREAMSERVE_LOG_FORMAT=json`: every line it writes is a JSON object
(its own, uvicorn's), a job's events among them with their fields; /metrics serves the job and
is not in the access log."""

from __future__ import annotations

import json

import httpx
import pytest
from servers import DREAMSERVE_SERVE, serving, wait_completed
from support import SMALL, free_port

pytestmark = pytest.mark.blackbox


def test_json_logs_carry_the_job_events_and_scrapes_stay_out_of_the_access_log(tmp_path) -> None:
    port = free_port()
    extra = {"DREAMSERVE_LOG_FORMAT": "json"}
    with serving(tmp_path / "data", port, command=DREAMSERVE_SERVE, extra=extra) as server:
        token = server.token
        assert token is not None
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=30) as client:
            jobid = client.post("/v1/dreamina/images", json=SMALL).json()["jobid"]
            assert wait_completed(client, jobid)["status"] == "completed"
            scraped = client.get("/metrics")
            assert scraped.status_code == 200
            assert "dreamserve_jobs_completed_total{" in scraped.text
        server.stop()
    logged = [
        json.loads(line)
        for line in server.lines
        if line.startswith("{")  # the first start's banner is printed, not logged
    ]
    assert logged, server.output
    assert all({"time", "level", "logger", "message"} <= set(line) for line in logged)
    events = [line["event"] for line in logged if line.get("jobid") == jobid]
    assert events == ["job.admitted", "job.started", "job.completed"]
    access = [line["message"] for line in logged if line["logger"] == "uvicorn.access"]
    assert any("/v1/dreamina/images" in message for message in access)
    assert not any("/metrics" in message for message in access)
    assert all(token not in json.dumps(line) for line in logged)
