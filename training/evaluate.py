"""The re-make check: a shipped student version against the same version re-made from its manifest's recipe.

    python -m training.evaluate remake --family wildlife_mnist --version v4 --remade /tmp/remake   # vs its re-make

The result goes to --results-dir as JSON (`remake_<family>_<version>.json`) and into its marked section of
--results-md. The research experiments (fidelity, the invariant classifier, the SKDCGN paper's tables) are run by
`python -m experiments` (experiments/evaluate.py), which also re-renders this section (`render`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.manifest import ManifestError, VersionNotFound, resolve_version
from core.settings import Paths
from reporting import report
from training.evaluation import remake


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    paths = Paths.from_env()  # default: the model repository
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["remake"])
    parser.add_argument("--family", required=True, help="model family")
    parser.add_argument("--models-dir", default=str(paths.models_dir),
                        help="model repository (default $SKDCGN_MODELS_DIR, else models)")
    parser.add_argument("--version", help="student version (default the family's LATEST)")
    parser.add_argument("--remade", required=True, help="the model repository that `training.distill --recipe "
                                                        "models/<family>/<version>` wrote the same version into")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    return parser.parse_args(argv)


def render_remake(results_md: str, result: dict) -> str:
    body = remake.markdown(result)
    report.update_section(results_md, remake.section_name(result), body)
    return body


def run_remake(args: argparse.Namespace) -> None:
    """The shipped version against its re-make (same version name in --remade), written and rendered."""
    version, shipped = resolve_version(args.models_dir, args.family, args.version)
    result = remake.compare(shipped, Path(args.remade) / args.family / version)
    report.write_json(Path(args.results_dir) / f"remake_{args.family}_{version}.json", result)
    print(render_remake(args.results_md, result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_remake(args)
    except (ManifestError, VersionNotFound, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
