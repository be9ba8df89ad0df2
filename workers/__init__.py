"""Celery workers: load the students with onnxruntime, render counterfactuals, run dataset-job chunks.

Import nothing here: the gateway imports workers.celery_app and workers.protocol, and must not pull in
onnxruntime through this package.
"""
