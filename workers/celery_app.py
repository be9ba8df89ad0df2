"""The worker's Celery app: `celery -A workers.celery_app worker` (configuration in core.celery_config)."""
from __future__ import annotations

from celery import signals

from core import logs
from core.celery_config import make_celery
from core.settings import Settings

settings = Settings.from_env()
app = make_celery(settings, include=("workers.tasks",))


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def log_request_ids(logger=None, **_) -> None:
    """Celery's log handlers in the project's format, each line with the request id it is about."""
    for handler in logger.handlers:
        logs.attach(handler, settings.log_format)
