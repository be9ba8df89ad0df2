"""`python -m experiments ...`: the research CLI (experiments/evaluate.py)."""
import sys

from experiments.evaluate import main

sys.exit(main())
