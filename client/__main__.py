"""`python -m client ...` is the `skdcgn` command."""
import sys

from client.cli import main

sys.exit(main())
