"""The worker's Celery app: `celery -A workers.celery_app worker` (configuration in core.celery_config)."""
from __future__ import annotations

import logging
import sys

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


@signals.import_modules.connect
def refuse_to_start_without_gpu(**_) -> None:
    """SKDCGN_REQUIRE_GPU=1 (GPU workers): exit 1, with one log line saying why, unless onnxruntime's CUDA provider
    runs here, instead of quietly serving on the CPU.

    import_modules fires as a worker starts, before it imports workers.tasks (whose LoadedModels would raise the
    same GpuUnavailable) and before worker_init, so nothing is loaded and no queue is consumed.
    """
    if not settings.require_gpu:
        return
    from core.runtime import GpuUnavailable, execution_providers  # onnxruntime only where the check runs

    try:
        execution_providers(require_gpu=True)
    except GpuUnavailable as exc:
        logs.configure(settings.log_format)  # Celery has not set up logging yet
        logging.getLogger(__name__).critical("worker refuses to start: %s", exc)
        sys.exit(1)
