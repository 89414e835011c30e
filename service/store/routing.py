"""Routing as desired state in model.toml: changed under a lock, written whole, read by all.

Every worker of every replica applies what model.toml says, so a change is made by writing the
file: under an exclusive lock on the model folder (two changes never interleave), validated
before it is written, to a temporary file that is renamed over the old one (a reader sees the
old file or the new one, never half of one). Comments and layout a user wrote are kept.
"""

import fcntl
import hashlib
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service.errors import Conflict, Forbidden, InvalidInput
from service.store.repository import CONFIG_NAME, ModelConfig

# tomlkit (which keeps a user's comments and layout) is imported where model.toml is written:
# every command that loads a model imports this module, and few write routing.
if TYPE_CHECKING:
    from tomlkit import TOMLDocument

# What GET .../routing shows and PUT .../routing accepts (besides `revision`).
ROUTING_KEYS = ("default_version", "aliases", "traffic", "shadow", "version_policy", "batching")


def routing_document(config: ModelConfig) -> dict[str, Any]:
    """The model's routing as JSON: the model.toml keys, with version keys as strings."""
    data = config.model_dump(mode="json", exclude_none=True)
    document = {key: data[key] for key in ROUTING_KEYS if key in data}
    document.setdefault("default_version", None)
    document.setdefault("shadow", None)
    document["unloaded"] = config.unloaded
    document["revision"] = config.revision
    return document


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    # flock on the folder itself: nothing is added to the repository for the lock.
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(folder: Path, text: str) -> None:
    # A dot file: repository scans and fingerprints pass over it.
    temporary = folder / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    with temporary.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, folder / CONFIG_NAME)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def change_config(
    folder: Path,
    change: Callable[["TOMLDocument"], None],
    expected_revision: int | None = None,
    check: Callable[[ModelConfig], None] | None = None,
) -> ModelConfig:
    """Apply `change` to model.toml, bump its revision and write it; returns what was written.

    With `expected_revision`, the change is refused (Conflict) if the file moved on meanwhile,
    so a read-modify-write by a client cannot undo another client's change. `check` may refuse
    the resulting configuration before anything is written.
    """
    import tomlkit

    path = folder / CONFIG_NAME
    with _locked(folder):
        document = tomlkit.parse(path.read_text()) if path.is_file() else tomlkit.document()
        current = int(document.get("revision", 0))
        if expected_revision is not None and expected_revision != current:
            raise Conflict(
                f"{path} is at revision {current}, not {expected_revision}: it changed "
                "meanwhile; read the routing again and repeat the change"
            )
        change(document)
        document["revision"] = current + 1
        text = tomlkit.dumps(document)
        try:
            config = ModelConfig.model_validate(tomllib.loads(text))
        except (ValidationError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"the routing is not valid: {_first_error(exc)}") from None
        if check is not None:
            check(config)
        try:
            _write(folder, text)
        except OSError as exc:
            raise Forbidden(
                f"{path} cannot be written ({exc.strerror}): routing changes are written to the "
                "repository, so mount it read-write (a ReadWriteMany volume for replicas)"
            ) from None
    return config


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))
    return str(exc)


def _table(values: Mapping[str, Any]) -> Any:
    import tomlkit

    table = tomlkit.table()
    for key, value in values.items():
        table[str(key)] = value
    return table


def set_routing(document: "TOMLDocument", routing: Mapping[str, Any]) -> None:
    """Replace the routing keys present in `routing`; None or empty removes a key."""
    for key in ROUTING_KEYS:
        if key not in routing:
            continue
        value = routing[key]
        if value is None or value == {}:
            document.pop(key, None)
        elif isinstance(value, Mapping):
            document[key] = _table(value)
        else:
            document[key] = value


def set_unloaded(unloaded: bool) -> Callable[["TOMLDocument"], None]:
    def change(document: "TOMLDocument") -> None:
        if unloaded:
            document["unloaded"] = True
        else:
            document.pop("unloaded", None)

    return change


def split_point(routing_key: str) -> float:
    """Where a routing key falls in [0, 1): the same key, the same point, on every replica."""
    digest = hashlib.blake2b(routing_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_version(traffic: Mapping[int, float], point: float) -> int:
    """The version whose share of [0, 1) holds `point`, shares laid out in version order.

    Changing one weight moves only the keys between the old and new boundary, so most users
    stay on the version they had.
    """
    total = sum(traffic.values())
    edge = 0.0
    versions = sorted(traffic)
    for version in versions:
        edge += traffic[version] / total
        if point < edge:
            return version
    return versions[-1]
