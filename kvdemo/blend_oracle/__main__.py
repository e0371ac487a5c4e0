"""``python -m kvdemo.blend_oracle``."""

import sys

from .cli import main

sys.exit(main())
