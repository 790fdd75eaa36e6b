"""docs/evaluation.md: every command it shows parses, every flag it names exists."""

from __future__ import annotations

import os
import re
import shlex

from accelerate.commands.launch import launch_command_parser
from conftest import ROOT

from dpo_core.cli import report_parser
from dpo_core.config.evaluation import EvalConfig
from dpo_core.config.fields import build_parser, parse_config
from dpo_core.config.train import TrainConfig

with open(os.path.join(ROOT, "docs", "evaluation.md")) as f:
    DOC = f.read()


def commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC, flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_every_command_in_the_docs_parses():
    seen = set()
    for words in commands():
        if words[0] == "accelerate":  # accelerate launch [its flags] -m dpo_core.evaluate ...
            launch_command_parser().parse_args(words[2:])
            words = ["python", *words[words.index("-m"):]]
        if words[0] == "dpo-report":
            report_parser().parse_args(words[1:])
        elif words[:2] == ["python", "train.py"]:
            parse_config(TrainConfig, build_parser(TrainConfig, ""), words[2:]).validate()
        else:
            assert words[0] == "dpo-eval" or words[:3] == ["python", "-m", "dpo_core.evaluate"], \
                words
            arguments = words[1:] if words[0] == "dpo-eval" else words[3:]
            parse_config(EvalConfig, build_parser(EvalConfig, ""), arguments).validate()
        seen.add(words[0])
    assert seen == {"python", "dpo-eval", "dpo-report"}


def test_every_flag_in_the_docs_exists():
    known = set()
    for parser in (build_parser(EvalConfig, ""), build_parser(TrainConfig, ""),
                   launch_command_parser()):
        known |= set(parser._option_string_actions)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z_]*", DOC))
    assert named and named <= known, named - known
