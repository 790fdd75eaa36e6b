"""`python -m dpo_core.evaluate RUN_DIR`: the same as `dpo-eval RUN_DIR`."""

import sys

from dpo_core.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
