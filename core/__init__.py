"""Torch-free code shared by training, workers and the gateway.

Composition, noise and seeding, the manifest contract, image encoding and atomic file writes live
here once, so every part of the pipeline computes a counterfactual the same way; the vocabulary (vocabulary.py)
and the settings (settings.py) live here once too, in the standard library alone, so the client can import them.
"""
