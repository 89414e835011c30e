"""Every worker follows the repository: routing within a second, artifacts when polling is on.

Two watches run in each worker. The routing sync (always on, every MODELSERVE_ROUTING_SYNC_S)
looks at each model's model.toml and applies a changed one: that is how a change made through
one worker's admin API, another replica's, or by hand reaches every worker. Repository polling
(MODELSERVE_REPOSITORY_POLL_S, off by default) also loads models whose files changed and drops
those whose folder disappeared. Both reload a model the same way: versions that did not change
are kept as they are, new ones load and warm up before the swap.
"""

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from service.observability.exposition import multiprocess_directory
from service.observability.metrics import record_model
from service.server.state import ServiceState
from service.store.registry import Registry, reload_model
from service.store.repository import (
    CONFIG_NAME,
    config_stamp,
    fingerprint,
    is_model_name,
    read_model_config,
)
from service.store.routing import routing_document

logger = logging.getLogger(__name__)
_STATUS_PREFIX = "routing-"


def _model_folders(root: Path, model_name: str | None) -> dict[str, Path]:
    if model_name is not None:
        # The folder is that one model (MODELSERVE_MODEL_NAME), whatever its layout.
        return {model_name: root} if root.is_dir() else {}
    return {
        p.name: p
        for p in root.iterdir()
        if p.is_dir() and not p.is_symlink() and is_model_name(p.name)
    }


def changed_models(
    registry: Registry, root: Path, model_name: str | None = None
) -> tuple[list[str], list[str]]:
    """(models to load, models to drop), comparing the disk with what was loaded."""
    on_disk = _model_folders(root, model_name)
    to_load = [
        name
        for name, folder in sorted(on_disk.items())
        if name not in registry.unloaded
        and (
            name not in registry.models or registry.models[name].fingerprint != fingerprint(folder)
        )
    ]
    # Unloaded models too: once their folder is gone there is nothing left to load.
    to_drop = sorted(name for name in {*registry.models, *registry.unloaded} if name not in on_disk)
    return to_load, to_drop


def routing_changes(
    registry: Registry, root: Path, seen: dict[str, object], model_name: str | None = None
) -> list[str]:
    """Models whose model.toml is not the one applied: changed, or written for a model this
    worker does not serve yet (a load through another worker's API)."""
    changed = []
    for name, folder in sorted(_model_folders(root, model_name).items()):
        stamp = config_stamp(folder)
        entry = registry.models.get(name)
        if entry is not None:
            if stamp != entry.stamp:
                changed.append(name)
            continue
        if stamp is None or seen.get(name) == stamp:
            continue
        seen[name] = stamp
        config, _ = read_model_config(folder / CONFIG_NAME)
        # Only a change made through the API (a revision) loads an unknown model: new folders
        # dropped into the repository by hand wait for polling or the load API, as before.
        known_unloaded = name in registry.unloaded
        if config.revision > 0 and (known_unloaded or not config.unloaded):
            changed.append(name)
    return changed


async def reload_models(state: ServiceState, names: list[str], why: str) -> None:
    """Reload `names` from disk and swap the registry; the caller holds the repository lock."""
    root = state.settings.model_repository
    registry = state.registry
    for name in names:
        previous = registry.models.get(name)
        registry = await asyncio.to_thread(reload_model, registry, root, name, state.options)
        entry = registry.models.get(name)
        record_model(state.metrics, entry, previous=previous)
        if entry is None:
            logger.info("model %s unloaded (%s)", name, why, extra={"model": name})
        else:
            logger.info(
                "model %s applied (%s): revision %d",
                name,
                why,
                entry.config.revision,
                extra={"model": name},
            )
    state.router.registry = registry
    write_status(state)


async def sync_repository(state: ServiceState) -> None:
    """One round of repository polling: load what changed on disk, drop what left."""
    root = state.settings.model_repository
    async with state.repository_lock:
        to_load, to_drop = await asyncio.to_thread(
            changed_models, state.registry, root, state.options.model_name
        )
        registry = state.registry
        for name in to_drop:
            logger.info(
                "model %s left the repository; no longer served", name, extra={"model": name}
            )
            if (previous := registry.models.get(name)) is not None:
                record_model(state.metrics, None, previous=previous)
            registry = registry.forget(name)
        state.router.registry = registry
        if to_load:
            await reload_models(state, to_load, "new or changed on disk")
        elif to_drop:
            write_status(state)


async def sync_routing(state: ServiceState, seen: dict[str, object]) -> None:
    root = state.settings.model_repository
    names = await asyncio.to_thread(
        routing_changes, state.registry, root, seen, state.options.model_name
    )
    if names:
        async with state.repository_lock:
            await reload_models(state, names, "model.toml changed")


async def poll_repository(state: ServiceState, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sync_repository(state)
        except Exception:  # the polling boundary: a bad scan must not stop future scans
            logger.exception("repository scan failed")


async def follow_routing(state: ServiceState, interval_s: float) -> None:
    seen: dict[str, object] = {}
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sync_routing(state, seen)
        except Exception:  # the sync boundary: one bad file must not stop the next rounds
            logger.exception("routing sync failed")


def write_status(state: ServiceState) -> None:
    """What this worker serves, for GET .../routing on any worker (several workers only)."""
    directory = multiprocess_directory()
    if directory is None:
        return
    path = directory / f"{_STATUS_PREFIX}{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(worker_status(state)))
    os.replace(temporary, path)


def worker_status(state: ServiceState) -> dict[str, object]:
    registry = state.registry
    models: dict[str, object] = {}
    for name, entry in registry.models.items():
        models[name] = {
            **routing_document(entry.config),
            "serving": sorted(entry.versions),
            "default_version": entry.default_version,
            "traffic": {str(v): w for v, w in sorted(entry.traffic.items())},
        }
    for name in registry.unloaded:
        models[name] = {"unloaded": True}
    return {"pid": os.getpid(), "applied_at": time.time(), "models": models}


def worker_statuses(state: ServiceState) -> list[dict[str, object]]:
    """Every live worker's status: this one's as it is now, the others' as they last wrote it."""
    own = worker_status(state)
    directory = multiprocess_directory()
    if directory is None:
        return [own]
    statuses = [own]
    for path in sorted(directory.glob(f"{_STATUS_PREFIX}*.json")):
        pid = int(path.stem.removeprefix(_STATUS_PREFIX))
        if pid == os.getpid() or not Path(f"/proc/{pid}").exists():
            continue
        try:
            statuses.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now; the next read finds it
    return statuses
