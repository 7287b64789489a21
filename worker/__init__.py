"""Execution layer: the Celery app, the stage task, model backends, persistence."""
