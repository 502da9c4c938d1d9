"""The client's commands' own rules that need no server: a bad flag is argparse's usage error
(status 2, a message naming the flag), never a traceback."""

from __future__ import annotations

import pytest

from dreamserve.client import cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "--limit", "-1"], "argument --limit: must be above 0: '-1'"),
        (["jobs", "--limit", "0"], "argument --limit: must be above 0: '0'"),
        (["jobs", "--limit", "many"], "argument --limit: not a number: 'many'"),
        (["jobs", "--watch", "--interval", "-1"], "argument --interval: must be above 0: '-1'"),
        (["jobs", "--watch", "--interval", "0"], "argument --interval: must be above 0: '0'"),
    ],
)
def test_a_bad_number_is_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main([*args, "--server", "http://127.0.0.1:9"])
    assert ended.value.code == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1] == f"dreamserve jobs: error: {message}"
