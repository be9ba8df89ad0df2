"""Evaluation of distilled students against their CGN teacher (see training/evaluate.py for the CLI).

sources: the teacher and the shipped ONNX students behind one interface; counterfactuals: labelled
counterfactual data sets drawn with core.noise; classifier: the small CNN of CGN's Table 2; fidelity and
invariance: the measurements; report: JSON and docs/RESULTS.md sections.
"""
