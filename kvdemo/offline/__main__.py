"""``python -m kvdemo.offline``: the CLI."""

import sys

from .session import main

sys.exit(main())
