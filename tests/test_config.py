"""The README's configuration table lists exactly the settings the service reads."""

import re
from pathlib import Path

import pytest

from service.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_variables() -> set[str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(MODELSERVE_[A-Z0-9_]+)`", section, flags=re.MULTILINE))


def test_readme_table_matches_settings() -> None:
    declared = {f"MODELSERVE_{name.upper()}" for name in Settings.model_fields}
    assert readme_variables() == declared


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSERVE_PORT", "9123")
    monkeypatch.setenv("MODELSERVE_API_KEYS", "a, b,,c")
    settings = Settings()
    assert settings.port == 9123
    assert settings.api_key_list() == ["a", "b", "c"]


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSERVE_WORKERS", "0")
    with pytest.raises(ValueError, match="workers"):
        Settings()
