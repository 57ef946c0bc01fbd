"""The ``[database]`` section and the agent's online backups of its own database.

A backup is taken when the agent has started (its database just passed ``quick_check``) and
then every ``backup_interval``; the newest ``backup_keep`` are kept under
``<data_dir>/backups/``. A failed backup is an event (``database.backup_failed``), never a
stopped agent.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stoker.domain.events import EventType
from stoker.domain.units import parse_duration
from stoker.services.events import EventBus
from stoker.store import backup

log = logging.getLogger("stoker.backups")


class DatabaseConfig(BaseModel):
    """``[database]`` (env: ``STOKER_DATABASE__<KEY>``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backup_interval_s: float = Field(
        default=6 * 3600.0, ge=60, le=30 * 86_400, description="how often (a duration, '6h')"
    )
    backup_keep: int = Field(default=8, ge=1, le=1000, description="backups kept, newest")
    allow_empty_with_vm_dirs: bool = Field(
        default=False,
        description="start with an empty or missing database although vms/ holds VM "
        "directories (their records are then lost: restore a backup instead if you can)",
    )

    @field_validator("backup_interval_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class DatabaseBackups:
    """A Background: one backup now, then one every interval."""

    def __init__(
        self, db_path: Path, data_dir: Path, config: DatabaseConfig, events: EventBus
    ) -> None:
        self.db_path = db_path
        self.data_dir = data_dir
        self.config = config
        self.events = events
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="database backups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def backup_now(self) -> Path | None:
        """One backup; None (and an event) when it failed."""
        try:
            path = await asyncio.to_thread(
                backup.take_backup, self.db_path, self.data_dir, self.config.backup_keep
            )
        except Exception as exc:
            log.exception("database backup failed")
            self.events.publish(
                EventType.DATABASE_BACKUP_FAILED, f"database backup failed: {exc}", None
            )
            return None
        self.events.publish(
            EventType.DATABASE_BACKED_UP, f"database backed up to {path}", None, path=str(path)
        )
        return path

    async def _run(self) -> None:
        while True:
            await self.backup_now()
            await asyncio.sleep(self.config.backup_interval_s)
