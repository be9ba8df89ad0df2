"""`skdcgn`: counterfactuals, dataset jobs, the local model repository, distillation and the local service.

    skdcgn counterfactual --shape 3 --texture 2 --background 5 --n 8 --seed 1 --out grid.png
    skdcgn jobs create --n 1000 --format webdataset --seed 7 --wait --download DIR
    skdcgn jobs list | status ID | wait ID | download ID DIR | cancel ID
    skdcgn models list | promote --family F --version V | rollback --family F
    skdcgn distill ...    (python training/distill.py ...)      skdcgn serve ...   (make run)

SKDCGN_URL (default http://127.0.0.1:8000) and SKDCGN_API_KEY configure the client; --url and --api-key override
them. Exit codes: 0 ok; 1 a failure on the server's side (an error answer, an unreachable service, a failed or
cancelled job, a download that fails its checksum); 2 a usage error (bad arguments, or a request the server
refused as invalid: 400, 404, 405, 413, 415, 422).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from core.vocabulary import FORMATS, JOB_STATES, MECHANISMS

OK, FAILED, USAGE = 0, 1, 2
USAGE_STATUSES = (400, 404, 405, 413, 415, 422)  # the request was wrong, not the server
DELEGATED = ("distill", "serve")  # their arguments (and --help) belong to the command they run


def _labels(text: str) -> list[int]:
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated labels such as 0,1,2, got {text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError("a seed lies in 0 .. 2**63 - 1")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model family (default: the server's default)")
    parser.add_argument("--version", help="pin a version (default: the family's LATEST)")


def _add_mask(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mask modifiers (the paper's shape-mechanism study)")
    group.add_argument("--transparency", type=float, help="scale the mask by a in [0, 1]")
    group.add_argument("--rotation-deg", type=float, help="rotate the mask by an angle drawn in [-r, r], r ≤ 180")
    group.add_argument("--noise-std", type=float, help="add clipped N(0, σ²) noise to the mask, σ in [0, 1]")


def _mask(args) -> Optional[dict]:
    mask = {name: getattr(args, name) for name in ("transparency", "rotation_deg", "noise_std")
            if getattr(args, name) is not None}
    return mask or None


def _connection_options(parser: argparse.ArgumentParser, default=None) -> None:
    """--url, --api-key and --http-timeout: before the command or after it (there, they leave the first as it was)."""
    group = parser.add_argument_group("service")
    group.add_argument("--url", default=default, help="the service (default $SKDCGN_URL, else http://127.0.0.1:8000)")
    group.add_argument("--api-key", default=default, help="sent as X-API-Key (default $SKDCGN_API_KEY)")
    group.add_argument("--http-timeout", type=float, default=60.0 if default is None else default,
                       help="seconds per HTTP request (default 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skdcgn", description=__doc__.split("\n\n")[0],
                                     epilog="Run `skdcgn COMMAND --help` for a command's options.")
    _connection_options(parser)
    service = argparse.ArgumentParser(add_help=False)
    _connection_options(service, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cf = commands.add_parser("counterfactual", parents=[service], help="render counterfactuals to a PNG grid or an npz",
                             description="Render n counterfactuals (POST /counterfactual) and write them as a PNG "
                                         "grid (.png) or as arrays (.npz: images, labels, seed, model, and "
                                         "components or z when asked for).")
    for name in MECHANISMS:
        cf.add_argument(f"--{name}", type=int, required=True, help=f"label of the {name} mechanism")
    cf.add_argument("--n", type=_positive, default=1, help="images (default 1; at most the server's SKDCGN_MAX_N)")
    cf.add_argument("--seed", type=_seed, help="random when omitted (printed)")
    cf.add_argument("--out", required=True, help="output file: .png (a grid) or .npz")
    cf.add_argument("--columns", type=_positive, help="grid columns (default: about √n)")
    cf.add_argument("--components", action="store_true", help="also the mask, texture and background (npz; a PNG "
                                                              "grid gets them as extra rows)")
    cf.add_argument("--noise", action="store_true", help="also the z used (npz)")
    _add_model(cf)
    _add_mask(cf)

    gen = commands.add_parser("generate", parents=[service], help="render one mechanism's output to a PNG grid or an npz",
                              description="POST /generate/{mechanism}: masks (shape), textures or backgrounds.")
    gen.add_argument("mechanism", choices=MECHANISMS)
    gen.add_argument("--label", type=int, required=True)
    gen.add_argument("--n", type=_positive, default=1)
    gen.add_argument("--seed", type=_seed)
    gen.add_argument("--out", required=True, help="output file: .png (a grid) or .npz")
    gen.add_argument("--columns", type=_positive)
    _add_model(gen)

    jobs = commands.add_parser("jobs", help="dataset jobs: create, list, status, wait, download, cancel",
                               description="Dataset jobs on the service (POST/GET/DELETE /jobs).")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", parents=[service], help="queue a dataset job (and optionally wait and download it)",
                                description="Queue a dataset job; prints its id. With --wait, follow it to the "
                                            "end; with --download DIR, also fetch and verify every file.")
    create.add_argument("--n", type=_positive, required=True, help="samples")
    create.add_argument("--format", choices=FORMATS, default="npz", help="result format (default npz)")
    create.add_argument("--seed", type=_seed, help="random when omitted")
    create.add_argument("--per-shape", type=_positive, default=1, metavar="K",
                        help="counterfactuals per shape: groups of K samples share shape label and z")
    for name in MECHANISMS:
        create.add_argument(f"--{name}-labels", type=_labels, metavar="L,L,...",
                            help=f"the {name} labels samples may draw (default: all)")
    create.add_argument("--shard-size", type=_positive, help="samples per tar shard (png, webdataset)")
    create.add_argument("--wait", action="store_true", help="wait until the job has ended, with a progress bar")
    create.add_argument("--download", metavar="DIR", help="then download the result into DIR (implies --wait)")
    create.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model(create)
    _add_mask(create)

    listing = actions.add_parser("list", parents=[service], help="your jobs, newest first")
    listing.add_argument("--state", choices=JOB_STATES)
    listing.add_argument("--limit", type=_positive, default=20, help="at most this many (default 20)")
    listing.add_argument("--json", action="store_true", help="print the statuses as JSON")
    for name, text in (("status", "a job's status as JSON"), ("cancel", "cancel a queued or running job")):
        action = actions.add_parser(name, parents=[service], help=text,
                                    description=text[0].upper() + text[1:] + ".")
        action.add_argument("job", help="job id")
    wait = actions.add_parser("wait", parents=[service], help="wait until a job has ended, with a progress bar")
    wait.add_argument("job", help="job id")
    wait.add_argument("--timeout", type=float, dest="wait_timeout", help="give up after this many seconds")
    wait.add_argument("--no-progress", action="store_true")
    download = actions.add_parser("download", parents=[service], help="download and verify a job's result files",
                                  description="Download every file of a succeeded job into DIR, each checked "
                                              "against its sha256; an interrupted download resumes.")
    download.add_argument("job", help="job id")
    download.add_argument("directory", metavar="DIR")
    download.add_argument("--no-progress", action="store_true")

    models = commands.add_parser("models", help="the local model repository: list, promote, rollback",
                                 description="Versions in the local model repository (as python -m "
                                             "training.registry), or with `list --server` those the service has.")
    model_actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("list", "versions of every family (* marks LATEST)"),
                       ("promote", "point LATEST at a version whose files pass their sha256 check"),
                       ("rollback", "return LATEST to the version promoted before")):
        action = model_actions.add_parser(name, parents=[service] if name == "list" else [], help=text,
                                          description=text[0].upper() + text[1:] + ".")
        action.add_argument("--models-dir", help="model repository (default $SKDCGN_MODELS_DIR, else models)")
        action.add_argument("--family", required=name != "list", help="model family")
        if name == "promote":
            action.add_argument("--version", required=True, help="version to promote")
        if name == "list":
            action.add_argument("--server", action="store_true", help="list the service's models (GET /models)")

    commands.add_parser("distill", add_help=False, help="distil a CGN into students (training/distill.py; "
                                                        "`skdcgn distill --help` for its options)")
    commands.add_parser("serve", add_help=False, help="run Redis, a worker and the gateway locally (make run; "
                                                      "`skdcgn serve --help` for its options)")
    return parser


# --- commands ------------------------------------------------------------------------------------------------------

def _client(args):
    from client.api import Client

    return Client(args.url, args.api_key, timeout=args.http_timeout)


def _write_images(path: Path, rendered, columns: Optional[int], components: bool, extra: dict) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npz":
        arrays = {"images": rendered.images, "seed": np.int64(rendered.seed), "model": np.str_(rendered.model),
                  "version": np.str_(rendered.version), "manifest_sha256": np.str_(rendered.manifest_sha256),
                  **{name: np.asarray(value) for name, value in extra.items()}}
        for name, images in (rendered.components or {}).items():
            arrays[f"component_{name}"] = images
        for name, vectors in (rendered.z or {}).items():
            arrays[f"z_{name}"] = vectors
        np.savez(path, **arrays)
        return
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {path}: write a .png grid or an .npz")
    from PIL import Image

    from core.imageio import grid

    rows = [rendered.images] + ([rendered.components[name] for name in ("mask", "texture", "background")
                                 if name in rendered.components] if components and rendered.components else [])
    count = len(rendered.images)
    picture = grid(np.concatenate(rows), columns=count if len(rows) > 1 else columns) \
        if count > 1 or len(rows) > 1 else rendered.images[0]
    Image.fromarray(picture).save(path, format="PNG")


def cmd_counterfactual(args) -> int:
    with _client(args) as client:
        rendered = client.counterfactual(args.shape, args.texture, args.background, args.n, args.seed,
                                         model=args.model, version=args.version, mask=_mask(args),
                                         return_components=args.components, return_noise=args.noise)
    labels = [[args.shape, args.texture, args.background]] * args.n
    _write_images(Path(args.out), rendered, args.columns, args.components, {"labels": labels})
    print(f"wrote {args.out}: {args.n} counterfactual(s), seed {rendered.seed}, "
          f"{rendered.model}/{rendered.version}")
    return OK


def cmd_generate(args) -> int:
    with _client(args) as client:
        rendered = client.generate(args.mechanism, args.label, args.n, args.seed, model=args.model,
                                   version=args.version)
    _write_images(Path(args.out), rendered, args.columns, False, {"labels": [args.label] * args.n})
    print(f"wrote {args.out}: {args.n} {args.mechanism} output(s), seed {rendered.seed}, "
          f"{rendered.model}/{rendered.version}")
    return OK


def _print_job(job) -> None:
    print(f"{job.id}  {job.state:<9}  {job.done}/{job.total}  {job.format:<10}  {job.model}/{job.version}  "
          f"seed {job.seed}  created {job.created}" + (f"  error: {job.error}" if job.error else ""))


def _download(client, job, directory: str, progress: bool) -> None:
    files = client.download(job, directory, progress=progress)
    for item in files:
        note = f", resumed from {item.resumed_from} bytes" if item.resumed_from else ""
        print(f"{item.path}  {item.bytes} bytes  sha256 {item.sha256} ok{note}")


def cmd_jobs(args) -> int:
    with _client(args) as client:
        if args.action == "create":
            labels = {name: getattr(args, f"{name}_labels") for name in MECHANISMS
                      if getattr(args, f"{name}_labels") is not None}
            job = client.create_job(args.n, format=args.format, seed=args.seed,
                                    counterfactuals_per_shape=args.per_shape, labels=labels or None,
                                    mask=_mask(args), model=args.model, version=args.version,
                                    shard_size=args.shard_size)
            print(job.id, flush=True)
            if args.wait or args.download:
                job = client.wait(job, progress=not args.no_progress)
                print(f"job {job.id} succeeded: {job.total} samples, {len(job.files or [])} file(s)", flush=True)
            if args.download:
                _download(client, job, args.download, not args.no_progress)
        elif args.action == "list":
            jobs = client.jobs(args.state, args.limit)
            if args.json:
                print(json.dumps([job.raw for job in jobs], indent=2))
            for job in [] if args.json else jobs:
                _print_job(job)
        elif args.action == "status":
            print(json.dumps(client.status(args.job).raw, indent=2))
        elif args.action == "wait":
            job = client.wait(args.job, progress=not args.no_progress, timeout=args.wait_timeout)
            _print_job(job)
        elif args.action == "download":
            _download(client, args.job, args.directory, not args.no_progress)
        else:
            job = client.cancel(args.job)
            _print_job(job)
    return OK


def cmd_models(args) -> int:
    if args.action == "list" and args.server:
        with _client(args) as client:
            listing = client.models(args.family)
        for family in [listing] if args.family else listing["models"]:
            for version in family["versions"]:
                marker = "*" if version.get("latest") else " "
                print(f"{marker} {family['name']}/{version['version']}  {version.get('status', '')}  "
                      f"created {version.get('created', '?')}" +
                      (f"  ({version['reason']})" if version.get("reason") else ""))
        return OK
    # The local repository, with training.registry's own functions (core/ only: no torch needed).
    from core.manifest import LATEST_NAME, ManifestError, VersionNotFound, list_families
    from core.settings import Paths
    from training import registry

    models_dir = args.models_dir or str(Paths.from_env().models_dir)
    try:
        if args.action == "promote":
            registry.promote(models_dir, args.family, args.version)
            print(f"{args.family}: {LATEST_NAME} -> {args.version}")
        elif args.action == "rollback":
            print(f"{args.family}: {LATEST_NAME} -> {registry.rollback(models_dir, args.family)}")
        else:
            for family in [args.family] if args.family else list_families(models_dir):
                for row in registry.describe(models_dir, family):
                    marker = "*" if row["latest"] else " "
                    print(f"{marker} {family}/{row['version']}  created {row['created']}  {json.dumps(row['metrics'])}")
    except (ManifestError, VersionNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    return OK


def _delegate(command: str, argv: list[str]) -> int:
    """distill and serve run the project's own CLIs, imported only now (they need the training or gateway deps)."""
    try:
        if command == "distill":
            from training.distill import main as delegate
        else:
            from service.run_local import main as delegate
    except ImportError as exc:
        extra = "training" if command == "distill" else "gateway,worker,cpu"
        print(f"error: skdcgn {command} needs the project's {extra} dependencies (pip install .[{extra}]): {exc}",
              file=sys.stderr)
        return FAILED
    try:
        return int(delegate(argv) or 0)
    except SystemExit as exit_:  # their argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (OK if exit_.code is None else USAGE)


COMMANDS = {"counterfactual": cmd_counterfactual, "generate": cmd_generate, "jobs": cmd_jobs, "models": cmd_models}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else OK
    if args.command in DELEGATED:
        return _delegate(args.command, extra)
    if extra:
        try:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as exit_:
            return int(exit_.code)

    from client.errors import APIError, SkdcgnError
    try:
        return COMMANDS[args.command](args)
    except APIError as exc:
        print(f"error: {exc.message} (HTTP {exc.status})", file=sys.stderr)
        return USAGE if exc.status in USAGE_STATUSES else FAILED
    except ValueError as exc:  # a bad value, SKDCGN_* settings included
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except (SkdcgnError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
