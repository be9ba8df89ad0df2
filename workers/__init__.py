"""Celery workers: load the students with onnxruntime, render counterfactuals, run dataset-job chunks.

Workers and the gateway meet only in core/ (settings, core.messages, core.jobs): nothing here imports service/.
"""
