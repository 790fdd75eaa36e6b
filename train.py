"""Align a causal language model with Direct Preference Optimization: `python train.py --help`.

The command line lives in `dpo_core.cli` (installed as `dpo-train`); this file is its
entry point from a checkout.
"""

import sys

from dpo_core.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
