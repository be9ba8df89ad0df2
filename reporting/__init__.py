"""What research (experiments/) and benchmarks/ both write and judge, so that neither imports the other.

report: result JSON files and the marked sections of docs/RESULTS.md; targets: the students' targets per family
and how a version measures against them; plots: writing matplotlib figures (matplotlib imported only when a
figure is saved). Imports core only (standard library otherwise); training, benchmarks and experiments import it.
"""
