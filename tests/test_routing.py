"""Routing in model.toml: written whole and safely, picked per request, applied by reloads that
keep serving."""

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from service.errors import Conflict, Forbidden, InvalidInput
from service.store.registry import LoadOptions, load_model, load_registry, reload_model
from service.store.repository import read_model_config, scan_model
from service.store.routing import (
    change_config,
    pick_version,
    set_routing,
    set_unloaded,
    split_point,
)


@pytest.fixture
def iris(iris_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the iris model folder, with a third version (a copy of version 1)."""
    folder = tmp_path / "models" / "iris"
    shutil.copytree(iris_repository / "iris", folder)
    shutil.copytree(folder / "1", folder / "3")
    return folder


def test_a_change_keeps_the_users_comments_and_bumps_the_revision(iris: Path) -> None:
    (iris / "model.toml").write_text("# chosen by the ML team\ndefault_version = 2  # ONNX\n")
    config = change_config(iris, lambda doc: set_routing(doc, {"traffic": {"2": 90, "3": 10}}))
    assert config.revision == 1
    assert config.traffic == {2: 90, 3: 10}
    text = (iris / "model.toml").read_text()
    assert "# chosen by the ML team" in text
    assert "default_version = 2  # ONNX" in text
    assert read_model_config(iris / "model.toml")[0] == config
    assert not [p for p in iris.iterdir() if p.name.startswith(".")]  # no temporary file left
    second = change_config(iris, lambda doc: set_routing(doc, {"traffic": None}))
    assert (second.revision, second.traffic) == (2, {})


def test_a_change_from_a_stale_revision_is_refused(iris: Path) -> None:
    change_config(iris, lambda doc: set_routing(doc, {"default_version": 1}))
    before = (iris / "model.toml").read_text()
    with pytest.raises(Conflict, match="revision 1, not 0"):
        change_config(iris, lambda doc: set_routing(doc, {"default_version": 3}), 0)
    assert (iris / "model.toml").read_text() == before


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"traffic": {"2": -1, "3": 2}}, "must not be negative"),
        ({"traffic": {"2": 0}}, "more than 0"),
        ({"shadow": {"source": 2, "target": 2}}, "different versions"),
        ({"shadow": {"source": 2, "target": 3, "fraction": 1.5}}, "fraction"),
        ({"aliases": {"7": 2}}, "must be a name, not a number"),
        ({"aliases": {"../x": 2}}, "must be a name of letters, digits"),
    ],
)
def test_an_invalid_routing_is_never_written(
    iris: Path, routing: dict[str, object], message: str
) -> None:
    before = (iris / "model.toml").read_text()
    with pytest.raises(InvalidInput, match=message):
        change_config(iris, lambda doc: set_routing(doc, routing))
    assert (iris / "model.toml").read_text() == before


def test_a_repository_that_cannot_be_written_refuses_the_change_saying_why(iris: Path) -> None:
    # Where the temporary file would go, a folder: the write fails as on a read-only volume.
    (iris / f".model.toml.{os.getpid()}.tmp").mkdir()
    before = (iris / "model.toml").read_text()
    with pytest.raises(Forbidden, match="mount it read-write"):
        change_config(iris, lambda doc: set_routing(doc, {"default_version": 1}))
    assert (iris / "model.toml").read_text() == before


def test_a_split_sends_each_key_to_one_version_in_proportion() -> None:
    traffic = {2: 90.0, 3: 10.0}
    picked = Counter(pick_version(traffic, split_point(f"user-{i}")) for i in range(20_000))
    assert abs(picked[3] / 20_000 - 0.10) < 0.01
    assert {pick_version(traffic, split_point("user-42")) for _ in range(100)} == {
        pick_version(traffic, split_point("user-42"))
    }
    # Moving the split from 10 % to 20 % moves only keys onto the canary, none off it.
    wider = {2: 80.0, 3: 20.0}
    for i in range(2_000):
        point = split_point(f"user-{i}")
        if pick_version(traffic, point) == 3:
            assert pick_version(wider, point) == 3


def test_a_reload_keeps_unchanged_versions_and_loads_new_ones(iris: Path) -> None:
    root = iris.parent
    registry = load_registry(root, LoadOptions())
    before = registry.models["iris"]
    shutil.copytree(iris / "2", iris / "4")
    change_config(iris, lambda doc: set_routing(doc, {"aliases": {"candidate": 4}}))
    after = reload_model(registry, root, "iris", LoadOptions()).models["iris"]
    for number in (1, 2, 3):
        assert after.versions[number] is before.versions[number]  # same object, same batcher
    assert after.versions[4] is not before.versions[2]
    assert after.aliases == {"candidate": 4}
    assert after.config.revision == 1


def test_a_changed_artifact_that_fails_keeps_the_old_one_serving(iris: Path) -> None:
    source = scan_model(iris.parent, "iris")
    entry = load_model(source, LoadOptions())
    with (iris / "2" / "model.onnx").open("ab") as artifact:
        artifact.write(b"half a copy")
    reloaded = load_model(scan_model(iris.parent, "iris"), LoadOptions(), entry)
    assert reloaded.versions[2] is entry.versions[2]
    assert reloaded.stale[2].reason == "hash_mismatch"
    assert 2 not in reloaded.failures
    # Without a serving version to fall back on, the same file is a plain failure.
    fresh = load_model(scan_model(iris.parent, "iris"), LoadOptions())
    assert 2 not in fresh.versions
    assert fresh.failures[2].reason == "hash_mismatch"


def test_unversioned_requests_follow_the_split_and_explicit_ones_bypass_it(iris: Path) -> None:
    root = iris.parent
    change_config(iris, lambda doc: set_routing(doc, {"traffic": {"1": 1, "3": 1}}))
    registry = load_registry(root, LoadOptions())
    seen = Counter(registry.resolve("iris", None, f"key-{i}").version for i in range(400))
    assert set(seen) == {1, 3}
    assert registry.resolve("iris", "2", "key-1").version == 2
    same = {registry.resolve("iris", None, "one-user").version for _ in range(50)}
    assert len(same) == 1


def test_an_unloaded_model_stays_unloaded_when_the_server_starts(iris: Path) -> None:
    change_config(iris, set_unloaded(True))
    registry = load_registry(iris.parent, LoadOptions())
    assert "iris" not in registry.models
    assert "iris" in registry.unloaded
