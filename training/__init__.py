"""Distillation of CGN teachers into TinyGAN students, ONNX export and the model registry (needs torch)."""
