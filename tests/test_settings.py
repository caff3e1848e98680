"""Settings come from the environment and an optional TOML file; mistakes fail loudly, naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EQUIPOISE_"):
            monkeypatch.delenv(key)


def test_embedded_defaults_use_sqlite_under_state_dir(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'equipoise.db'}"
    assert settings.registry_dir == tmp_path / "models"
    assert settings.host == "127.0.0.1" and not settings.auth_required


def test_environment_overrides_file_which_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "equipoise.toml"
    config.write_text('port = 9000\ndevice = "cpu"\nminority_classes = ["fear"]\n')
    monkeypatch.setenv("EQUIPOISE_CONFIG", str(config))
    monkeypatch.setenv("EQUIPOISE_PORT", "9100")
    settings = load_settings()
    assert (settings.port, settings.device, settings.minority_classes) == (9100, "cpu", ("fear",))


def test_minority_classes_from_comma_separated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUIPOISE_MINORITY_CLASSES", "fear, disgust")
    assert load_settings().minority_classes == ("fear", "disgust")


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("EQUIPOISE_PORT", "eighty", "EQUIPOISE_PORT"),
        ("EQUIPOISE_PORT", "70000", "EQUIPOISE_PORT"),
        ("EQUIPOISE_DEVICE", "tpu", "EQUIPOISE_DEVICE"),
        ("EQUIPOISE_BATCH_MAX_SIZE", "0", "EQUIPOISE_BATCH_MAX_SIZE"),
        ("EQUIPOISE_DATABSE_URL", "sqlite://", "EQUIPOISE_DATABSE_URL"),
    ],
)
def test_malformed_or_unknown_environment_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_unknown_key_in_config_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "equipoise.toml"
    config.write_text("prot = 1\n")
    monkeypatch.setenv("EQUIPOISE_CONFIG", str(config))
    with pytest.raises(SettingsError, match="prot"):
        load_settings()


def test_missing_config_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUIPOISE_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings()


def test_auth_defaults_on_for_non_loopback_hosts() -> None:
    assert load_settings(host="0.0.0.0").auth_required
    assert not load_settings(host="127.0.0.1").auth_required
    assert load_settings(host="127.0.0.1", auth_enabled=True).auth_required
