"""The worker's Celery app: `celery -A workers.celery_app worker` (configuration in core.celery_config)."""
from __future__ import annotations

from core.celery_config import make_celery
from core.settings import Settings

settings = Settings.from_env()
app = make_celery(settings, include=("workers.tasks",))
