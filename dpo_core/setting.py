"""One setting: a dataclass field that is also a command-line flag and a config-file key.

`setting(default, help, group)` is how every option is declared, in `TrainConfig`,
`ChatConfig` and the loss options (`dpo_core.losses.options`): `dpo_core.config.fields` builds
the parser, the `--help` groups and the config-file checks from these fields. Torch-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str, group: str, aliases: tuple[str, ...] = (),
            **argparse_kwargs: Any) -> Any:
    """A dataclass field with its `--help` text, its `--help` group, other names it answers
    to on the command line and in config files (`aliases`, e.g. trl's name for it) and any
    further `argparse.add_argument` keywords (e.g. `choices`); `positional=True` makes it a
    required operand instead of a flag."""
    metadata = {"help": help, "group": group, "aliases": aliases, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)
