"""The audit log: one line per admin action, on the logger `service.audit`.

Who (the identity's kind and subject: a token's subject or a key id, never a secret), what (the
action, the model, the change), when (the line's time) and the result (`ok` or the error).
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from service.errors import ServiceError
from service.server.auth import Identity

logger = logging.getLogger("service.audit")
T = TypeVar("T")


def audit(identity: Identity, action: str, model: str, result: str, **change: Any) -> None:
    fields = {"who": identity.name, "action": action, "model": model, "result": result, **change}
    level = logging.INFO if result == "ok" else logging.WARNING
    logger.log(level, "audit: %s %s by %s: %s", action, model, identity.name, result, extra=fields)


async def audited(
    identity: Identity,
    action: str,
    model: str,
    work: Awaitable[T],
    details: Callable[[T], dict[str, Any]] | None = None,
    **change: Any,
) -> T:
    """`work`'s result, with one audit line saying whether it succeeded and, if not, why;
    `details` adds what only the result knows (the versions a load brought up)."""
    try:
        result = await work
    except ServiceError as exc:
        audit(identity, action, model, f"{type(exc).__name__}: {exc.message}", **change)
        raise
    except Exception as exc:
        audit(identity, action, model, f"error: {type(exc).__name__}", **change)
        raise
    audit(identity, action, model, "ok", **change, **(details(result) if details else {}))
    return result
