"""kvdemo: a live, side-by-side demo of LMCache KV-cache reuse vs plain vLLM. See README.md."""

import sys

from kvdemo.main import main

if __name__ == "__main__":
    sys.exit(main())
