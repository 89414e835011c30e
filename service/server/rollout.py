"""Changing what serves, at run time: load, unload and routing, written to model.toml.

Each change is written to the model's model.toml first (durable, atomic, one revision more),
then applied by this worker before the answer; every other worker and replica applies it from
the file within MODELSERVE_ROUTING_SYNC_S. The answer says which revision holds the change and
how long the others may take.
"""

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from service.errors import InvalidInput, ModelNotFound
from service.protocols.schemas import ErrorResponse, Routing, RoutingChange
from service.server.audit import audited
from service.server.polling import reload_models, worker_statuses
from service.server.routes import ERRORS, Admin, AdminIdentity, State
from service.server.state import ServiceState
from service.store.repository import CONFIG_NAME, ModelConfig, model_dir, read_model_config
from service.store.routing import change_config, routing_document, set_routing, set_unloaded

# 409: a PUT whose revision is not the file's; 403 also for a repository that is read-only.
router = APIRouter(
    tags=["repository"],
    dependencies=[Admin],
    responses={**ERRORS, 409: {"model": ErrorResponse}},
)


def _folder(state: ServiceState, name: str) -> Path:
    root = state.settings.model_repository
    if state.options.model_name is not None:
        if name != state.options.model_name:
            raise ModelNotFound(f"model {name!r} is not served here")
        return root
    folder = model_dir(root, name)
    if not folder.is_dir():
        raise ModelNotFound(f"model {name!r} is not in the repository")
    return folder


def propagation_bound(sync_s: float) -> float:
    """How long other workers may take: a sync round may have just begun when the change was
    written (one interval), a round can wait behind a repository scan or a busy event loop (one
    more), and applying takes a moment (half a second covers a routing change on a loaded
    machine; new versions add their load time)."""
    return 2 * sync_s + 0.5


def _answer(state: ServiceState, name: str, folder: Path, extra_s: float = 0.0) -> RoutingChange:
    config, _ = read_model_config(folder / CONFIG_NAME)
    return RoutingChange(
        model=name,
        revision=config.revision,
        propagation_s=propagation_bound(state.settings.routing_sync_s) + extra_s,
        routing=Routing.model_validate(routing_document(config)),
    )


def _versions_named(routing: Routing) -> dict[str, list[int]]:
    named: dict[str, list[int]] = {}
    if routing.default_version is not None:
        named["default_version"] = [routing.default_version]
    if routing.aliases:
        named["aliases"] = sorted(set(routing.aliases.values()))
    if routing.traffic:
        try:
            named["traffic"] = sorted(int(v) for v in routing.traffic)
        except ValueError:
            raise InvalidInput("traffic keys must be version numbers") from None
    if routing.shadow is not None:
        named["shadow"] = [routing.shadow.source, routing.shadow.target]
    return named


def _unserved(state: ServiceState, name: str, routing: Routing) -> tuple[str, int] | None:
    """The first routing field naming a version this worker does not serve, and that version."""
    entry = state.registry.model(name)
    for key, versions in _versions_named(routing).items():
        missing = [v for v in versions if v not in entry.versions]
        if missing:
            return key, missing[0]
    return None


async def _check_versions(state: ServiceState, name: str, routing: Routing) -> None:
    """Routing may only point at versions that serve: a typo must not take traffic down.

    A version another worker loaded a moment ago reaches this one at its next sync round: the
    model is read again first, so that a load answered 200 is never followed by a refusal.
    """
    if _unserved(state, name, routing) is None:
        return
    await reload_models(state, [name], "routing names a version not yet applied here")
    unserved = _unserved(state, name, routing)
    if unserved is not None:
        key, version = unserved
        serving = ", ".join(str(v) for v in sorted(state.registry.model(name).versions))
        raise InvalidInput(
            f"{key} names version {version} of model {name!r}, which does not serve "
            f"(serving: {serving or 'none'}); load it first"
        )


def _policy_keeps_what_routing_names(
    state: ServiceState, name: str
) -> Callable[[ModelConfig], None]:
    """A new version policy must keep serving every version the routing names: the default,
    aliases, traffic and shadow would otherwise point at versions that no longer serve."""
    loaded = sorted(state.registry.model(name).versions)

    def check(config: ModelConfig) -> None:
        kept = set(config.version_policy.select(loaded))
        named = _versions_named(Routing.model_validate(routing_document(config)))
        for key, versions in named.items():
            left_out = [v for v in versions if v not in kept]
            if left_out:
                serving = ", ".join(str(v) for v in sorted(kept)) or "none"
                raise InvalidInput(
                    f"the version_policy leaves out version {left_out[0]} of model {name!r}, "
                    f"which {key} names (it would serve: {serving}); change {key} first"
                )

    return check


@router.get("/v2/repository/models/{name}/routing", response_model=Routing)
def get_routing(state: State, name: str) -> Routing:
    folder = _folder(state, name)
    config, _ = read_model_config(folder / CONFIG_NAME)
    workers = []
    for status in worker_statuses(state):
        models: dict[str, Any] = status.get("models", {})  # type: ignore[assignment]  # JSON
        workers.append({"pid": status["pid"], **models.get(name, {"unloaded": True})})
    return Routing.model_validate({**routing_document(config), "workers": workers})


@router.put("/v2/repository/models/{name}/routing", response_model=RoutingChange)
async def put_routing(
    state: State, who: AdminIdentity, name: str, routing: Routing
) -> RoutingChange:
    changes = routing.model_dump(
        include=routing.model_fields_set - {"revision", "unloaded", "workers"}, mode="json"
    )

    async def change() -> RoutingChange:
        folder = _folder(state, name)
        async with state.repository_lock:
            await _check_versions(state, name, routing)
            check = (
                _policy_keeps_what_routing_names(state, name)
                if "version_policy" in changes
                else None
            )
            await asyncio.to_thread(
                change_config,
                folder,
                lambda doc: set_routing(doc, changes),
                routing.revision,
                check,
            )
            await reload_models(state, [name], "routing changed through the API")
        return _answer(state, name, folder)

    return await audited(who, "routing", name, change(), change=changes)


@router.post("/v2/repository/models/{name}/load", response_model=RoutingChange)
async def repository_load(state: State, who: AdminIdentity, name: str) -> RoutingChange:
    async def load() -> RoutingChange:
        folder = _folder(state, name)
        async with state.repository_lock:
            await asyncio.to_thread(change_config, folder, set_unloaded(False))
            await reload_models(state, [name], "loaded through the API")
            entry = state.registry.model(name)
            if not entry.versions:
                reasons = "; ".join(f"version {v}: {f.reason}" for v, f in entry.failures.items())
                raise InvalidInput(
                    f"model {name!r} has no version that loads ({reasons or 'no versions'})"
                )
        load_s = max((v.load_seconds for v in entry.versions.values()), default=0.0)
        return _answer(state, name, folder, load_s)

    return await audited(
        who,
        "load",
        name,
        load(),
        lambda _: {"versions": sorted(state.registry.model(name).versions)},
    )


@router.post("/v2/repository/models/{name}/unload", response_model=RoutingChange)
async def repository_unload(state: State, who: AdminIdentity, name: str) -> RoutingChange:
    async def unload() -> RoutingChange:
        folder = _folder(state, name)
        async with state.repository_lock:
            if name not in state.registry.models:
                raise ModelNotFound(f"model {name!r} is not loaded")
            await asyncio.to_thread(change_config, folder, set_unloaded(True))
            await reload_models(state, [name], "unloaded through the API")
        return _answer(state, name, folder)

    return await audited(who, "unload", name, unload())
