"""Chat with a base model plus a DPO-trained adapter: `python chat.py --help`.

The command line lives in `dpo_core.cli` (installed as `dpo-chat`); this file is its entry
point from a checkout.
"""

import sys

from dpo_core.cli import chat_main as main

if __name__ == "__main__":
    sys.exit(main())
