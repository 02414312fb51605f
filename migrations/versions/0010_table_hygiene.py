"""Table hygiene: room on each page for updates, and autovacuum that keeps up as history grows.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 08:30:00

Every task is updated a few times (claimed, finished) and so is every conversation (marked
processed), while finished tasks pile up as history. Two storage settings keep the hot part
fast (measured by bench/sustained.py, bench/README.md):

- fillfactor leaves room on each page. A conversation's update touches no indexed column, so
  with room on its page it is a HOT update (no new index entries, no index bloat); the
  tasks' updates change indexed columns (status) and are never HOT, but the new version
  still lands on the same page. task_counts is a few rows updated by every transition: half
  empty pages keep those updates HOT.
- autovacuum by a fixed number of dead rows, not by a fraction of the table. PostgreSQL's
  default (20 % of the table) waits for 200,000 dead rows once a million tasks are kept: the
  claim's index then wades through dead entries. Here it runs after about 1 % or 2,000.

fillfactor applies to pages written from now on; an existing table's pages get it when they
are rewritten (VACUUM FULL, pg_repack), not by this migration.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_BY_ROWS = (
    "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 2000,"
    " autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_insert_threshold = 2000,"
    " autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 2000"
)

SETTINGS = {
    "tasks": f"fillfactor = 90, {_BY_ROWS}",
    "conversations": f"fillfactor = 85, {_BY_ROWS}",
    "task_counts": (
        "fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000"
    ),
}


def _names(settings: str) -> str:
    return ", ".join(part.split("=")[0].strip() for part in settings.split(","))


def upgrade():
    for table, settings in SETTINGS.items():
        op.execute(f"ALTER TABLE {table} SET ({settings})")


def downgrade():
    for table, settings in SETTINGS.items():
        op.execute(f"ALTER TABLE {table} RESET ({_names(settings)})")
