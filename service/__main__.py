"""`python -m service [--host H] [--port P]`: the gateway under uvicorn (settings from SKDCGN_* variables)."""
from __future__ import annotations

import argparse
import logging

import uvicorn

from core import logs
from core.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # Our handler for every logger, uvicorn's access log included: each line names its request id.
    logs.configure(Settings.from_env().log_format, logging.getLevelName(args.log_level.upper()))
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port, log_level=args.log_level,
                log_config=None)


if __name__ == "__main__":
    main()
