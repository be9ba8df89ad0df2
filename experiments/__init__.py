"""Research on the distilled students: the SKDCGN paper's experiments and the documents that report them.

`python -m experiments` (evaluate.py) runs fidelity, the invariant-classifier study and the paper's experiments;
`python -m experiments.generated write|check` renders README's and docs/RESULTS.md's generated blocks and each
shipped manifest's `targets` block. sources: the teacher and the shipped ONNX students behind one interface;
counterfactuals: labelled counterfactual data sets drawn with core.noise; classifier: the small CNN of CGN's
Table 2; fidelity and invariance: the measurements; paper and paper_report: the SKDCGN paper's experiments and
their sections; baseline_cgn: the no-distillation baseline (§4.2). Imports core, reporting, training and
benchmarks; nothing imports it.
"""
