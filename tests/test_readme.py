"""Every curl example in the README answers what the README shows, on a real server."""

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.serving import RunningServer

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
EXAMPLE = re.compile(r"```sh\n(curl [^\n]+)\n```\s*\n```json\n([^\n]+)\n```")
EXAMPLES = EXAMPLE.findall(README)


def matches(shown: Any, actual: Any) -> bool:
    """Equal, with float tolerance; "…" in the README stands for any value (e.g. a sha256)."""
    if shown == "…":
        return True
    if isinstance(shown, float) or isinstance(actual, float):
        return isinstance(actual, int | float) and actual == pytest.approx(
            shown, rel=1e-4, abs=1e-6
        )
    if isinstance(shown, dict):
        return (
            isinstance(actual, dict)
            and shown.keys() == actual.keys()
            and all(matches(shown[k], actual[k]) for k in shown)
        )
    if isinstance(shown, list):
        return (
            isinstance(actual, list)
            and len(shown) == len(actual)
            and all(matches(s, a) for s, a in zip(shown, actual, strict=True))
        )
    return bool(shown == actual)


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize(("command", "shown"), EXAMPLES, ids=range(len(EXAMPLES)))
def test_curl_example(server: RunningServer, command: str, shown: str) -> None:
    argv = [a.replace("localhost:8000", server.url) for a in shlex.split(command)]
    result = subprocess.run(argv, capture_output=True, check=True, timeout=30)
    actual = orjson.loads(result.stdout)
    assert matches(orjson.loads(shown), actual), result.stdout.decode()
