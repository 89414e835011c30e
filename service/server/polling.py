"""Repository polling: load models that appear or change on disk, drop those that disappear."""

import asyncio
import logging
from pathlib import Path

from service.observability.metrics import record_model
from service.server.state import ServiceState
from service.store.registry import Registry, reload_model
from service.store.repository import fingerprint, is_model_name

logger = logging.getLogger(__name__)


def changed_models(
    registry: Registry, root: Path, model_name: str | None = None
) -> tuple[list[str], list[str]]:
    """(models to load, models to drop), comparing the disk with what was loaded."""
    if model_name is not None:
        # The folder is that one model (MODELSERVE_MODEL_NAME), whatever its layout.
        on_disk = {model_name: root} if root.is_dir() else {}
    else:
        on_disk = {
            p.name: p
            for p in root.iterdir()
            if p.is_dir() and not p.is_symlink() and is_model_name(p.name)
        }
    to_load = [
        name
        for name, folder in sorted(on_disk.items())
        if name not in registry.unloaded
        and (
            name not in registry.models or registry.models[name].fingerprint != fingerprint(folder)
        )
    ]
    to_drop = [name for name in registry.models if name not in on_disk]
    return to_load, to_drop


async def sync_repository(state: ServiceState) -> None:
    root = state.settings.model_repository
    async with state.repository_lock:
        to_load, to_drop = await asyncio.to_thread(
            changed_models, state.registry, root, state.options.model_name
        )
        registry = state.registry
        for name in to_drop:
            logger.info("model %s left the repository; no longer served", name)
            record_model(state.metrics, None, previous=registry.models[name])
            registry = Registry(
                {k: v for k, v in registry.models.items() if k != name}, registry.unloaded
            )
        for name in to_load:
            logger.info("model %s is new or changed on disk; loading", name)
            previous = registry.models.get(name)
            registry = await asyncio.to_thread(reload_model, registry, root, name, state.options)
            record_model(state.metrics, registry.models[name], previous=previous)
        state.router.registry = registry


async def poll_repository(state: ServiceState, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sync_repository(state)
        except Exception:  # the polling boundary: a bad scan must not stop future scans
            logger.exception("repository scan failed")
