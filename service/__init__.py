"""The HTTP gateway: validates requests, answers from the batch cache, queues work on Celery, streams results.

It never imports torch or onnxruntime; workers do the rendering.
"""
