"""Alembic environment: runs every migration in one transaction under an advisory lock.

Several instances may start together on an empty database. Each takes the same
transaction-level advisory lock before Alembic reads the current revision, so the first
one migrates and the others, once it commits, find the schema at head and do nothing.
"""

import logging
from logging.config import fileConfig

import sqlalchemy.exc
from alembic import context
from flask import current_app
from sqlalchemy import text

from taskapp import DatabaseUnreachable, describe_connection_failure

# Chosen once, arbitrarily; only has to differ from other advisory locks in the database.
MIGRATION_LOCK_KEY = 7_243_001

config = context.config
if config.config_file_name is not None and not logging.getLogger().handlers:
    # Only when nothing configured logging: create_app (the service, `flask db upgrade`) has,
    # in LOG_FORMAT (taskapp.logs), so Alembic's lines come out as JSON when asked.
    fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")

target_db = current_app.extensions["migrate"].db


def run_migrations_offline() -> None:
    url = target_db.engine.url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_db.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _connect():
    """The engine's connection; an unreachable database is one line, not a traceback."""
    try:
        return target_db.engine.connect()
    except sqlalchemy.exc.OperationalError as exc:
        url = current_app.config["TASKAPP"].database_url
        raise DatabaseUnreachable(describe_connection_failure(url, exc.orig or exc)) from None


def run_migrations_online() -> None:
    def skip_empty_autogenerate(context, revision, directives):
        if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
            directives[:] = []
            logger.info("No changes in schema detected.")

    conf_args = dict(current_app.extensions["migrate"].configure_args)
    conf_args.setdefault("process_revision_directives", skip_empty_autogenerate)

    with _connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_db.metadata,
            transaction_per_migration=False,
            **conf_args,
        )
        with context.begin_transaction():
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
