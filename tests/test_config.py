"""The settings added for running past one machine: read from the environment, validated."""

from __future__ import annotations

import pytest

from taskapp.config import ConfigError, Settings


def test_listen_database_url_defaults_to_database_url() -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgres://u@pgbouncer:6432/db"})
    assert settings.listen_database_url is None
    assert (
        settings.listen_url == settings.database_url == "postgresql+psycopg://u@pgbouncer:6432/db"
    )


def test_listen_database_url_is_read_and_normalised() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgres://u@pgbouncer:6432/db",
            "LISTEN_DATABASE_URL": "postgresql://u@pg/db",
        }
    )
    assert settings.listen_url == "postgresql+psycopg://u@pg/db"
    # A changed DATABASE_URL does not leave a stale listen URL behind when none was given.
    assert Settings().with_changes(database_url="postgresql://a/b").listen_url.endswith("//a/b")


def test_probe_and_pooler_settings() -> None:
    settings = Settings.from_env(
        {"DB_PREPARED_STATEMENTS": "0", "DRAIN_SECONDS": "5", "LIVENESS_STALL_SECONDS": "30"}
    )
    assert (settings.db_prepared_statements, settings.drain_seconds) == (False, 5.0)
    assert settings.liveness_stall_seconds == 30.0
    defaults = Settings()
    assert (defaults.db_prepared_statements, defaults.drain_seconds) == (True, 0.0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LISTEN_DATABASE_URL": "mysql://x/y"}, "LISTEN_DATABASE_URL"),
        ({"DB_PREPARED_STATEMENTS": "maybe"}, "DB_PREPARED_STATEMENTS"),
        ({"DRAIN_SECONDS": "-1"}, "DRAIN_SECONDS"),
        ({"LIVENESS_STALL_SECONDS": "0"}, "LIVENESS_STALL_SECONDS"),
    ],
)
def test_malformed_values_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)
