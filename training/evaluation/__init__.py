"""What distillation measures of its own students (see training/evaluate.py for the re-make CLI).

heldout: fidelity on the bank's held-out pairs, written into each manifest by the trainer; remake: a shipped
version against the same version re-made from its recipe. The research experiments live in experiments/.
"""
