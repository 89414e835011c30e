"""Records every file and folder a test server opens under a watched folder.

Put this folder on PYTHONPATH and set MODELSERVE_TEST_AUDIT_LOG (where to write) and
MODELSERVE_TEST_AUDIT_PREFIX (which paths to record): Python imports this module at start-up,
and its audit hook sees every open(), os.listdir() and os.scandir() of the process.
"""

import os
import sys
from typing import Any

_LOG = os.environ.get("MODELSERVE_TEST_AUDIT_LOG")
_PREFIX = os.environ.get("MODELSERVE_TEST_AUDIT_PREFIX")
_EVENTS = {"open", "os.listdir", "os.scandir"}

if _LOG and _PREFIX:
    _prefix: str = _PREFIX
    # Opened once, before the hook exists, so writing to it never re-enters the hook.
    _sink = open(_LOG, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def _record(event: str, args: tuple[Any, ...]) -> None:
        if event not in _EVENTS or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if isinstance(path, str) and os.path.abspath(path).startswith(_prefix):
            _sink.write(f"{event}\t{os.path.abspath(path)}\n")

    sys.addaudithook(_record)
