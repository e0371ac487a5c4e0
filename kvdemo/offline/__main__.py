"""``python -m kvdemo.offline``: the CLI (:func:`kvdemo.offline.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
