"""``python -m p2pkv ...`` runs the CLI."""

import sys

from p2pkv.cli import main

sys.exit(main())
