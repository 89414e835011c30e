"""`modelserve route`: a client of a running server's routing API (the standard library only).

It reads the model's routing, changes what the flags say, and writes it back with the revision
it read, so a change made meanwhile by someone else is refused (409) instead of overwritten.
"""

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from service.errors import ServiceError


class ControlError(ServiceError):
    """The server refused the change, or could not be reached."""


@dataclass(frozen=True)
class RoutingFlags:
    default: int | None = None
    aliases: dict[str, int] = field(default_factory=dict)
    remove_aliases: list[str] = field(default_factory=list)
    traffic: dict[int, float] | None = None  # {} removes the split
    shadow: tuple[int, int, float] | None = None
    no_shadow: bool = False

    def changes(self) -> bool:
        return bool(
            self.default is not None
            or self.aliases
            or self.remove_aliases
            or self.traffic is not None
            or self.shadow is not None
            or self.no_shadow
        )


def parse_pairs(text: str, separator: str = "=") -> dict[str, str]:
    """'2=90,3=10' -> {'2': '90', '3': '10'}."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, found, value = item.partition(separator)
        if not found or not key or not value:
            raise ValueError(f"{item!r} is not KEY{separator}VALUE")
        pairs[key] = value
    return pairs


def _request(method: str, url: str, token: str | None, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise ControlError(f"{method} {url}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ControlError(f"{method} {url}: the server cannot be reached ({exc})") from None


def _apply(routing: dict[str, Any], flags: RoutingFlags) -> dict[str, Any]:
    change: dict[str, Any] = {"revision": routing["revision"]}
    if flags.default is not None:
        change["default_version"] = flags.default
    if flags.aliases or flags.remove_aliases:
        aliases = {**routing.get("aliases", {}), **flags.aliases}
        for alias in flags.remove_aliases:
            aliases.pop(alias, None)
        change["aliases"] = aliases
    if flags.traffic is not None:
        change["traffic"] = {str(v): w for v, w in flags.traffic.items()}
    if flags.no_shadow:
        change["shadow"] = None
    elif flags.shadow is not None:
        source, target, fraction = flags.shadow
        change["shadow"] = {"source": source, "target": target, "fraction": fraction}
    return change


def route(
    url: str, model: str, token: str | None, flags: RoutingFlags, action: str | None = None
) -> Any:
    """The routing after the change (or as it is, without one); `action` is load or unload."""
    base = f"{url.rstrip('/')}/v2/repository/models/{model}"
    if action is not None:
        return _request("POST", f"{base}/{action}", token, {})
    if not flags.changes():
        return _request("GET", f"{base}/routing", token)
    current = _request("GET", f"{base}/routing", token)
    return _request("PUT", f"{base}/routing", token, _apply(current, flags))
