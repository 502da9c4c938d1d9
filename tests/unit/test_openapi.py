"""The committed openapi.json is the app's own document (regenerate with `make openapi`)."""

from __future__ import annotations

import json
from pathlib import Path

from dreamserve.app import create_app
from dreamserve.settings import Settings

COMMITTED = Path(__file__).resolve().parents[2] / "openapi.json"


def test_the_committed_openapi_document_matches_the_app(tmp_path: Path) -> None:
    document = create_app(Settings(data_dir=tmp_path)).openapi()
    assert json.loads(COMMITTED.read_text()) == document, "run `make openapi` and commit the result"


def test_the_document_describes_the_image_endpoints(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    assert set(paths["/v1/dreamina/images"]) == {"post"}
    assert set(paths["/v1/dreamina/images/{jobid}"]) == {"get"}
    body = paths["/v1/dreamina/images"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "prompt" in body["application/json"]["schema"]["properties"]
