"""Which model version the running thread is calling, for whoever reports what the call warns."""

import threading


class _Calling(threading.local):
    model: tuple[str, int] | None = None


# Process-wide, as Python's warnings are: a warning reaches its handler with nothing that says
# which call raised it, but on the thread that made the call.
calling = _Calling()
