"""``python -m kvdemo.blend_oracle``."""

import sys

from .core import main

sys.exit(main())
