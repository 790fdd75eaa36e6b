"""`python -m dpo_core.reporting`: the same as `dpo-report`."""

import sys

from dpo_core.cli import report_main

sys.exit(report_main())
