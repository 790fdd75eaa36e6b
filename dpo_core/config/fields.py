"""The command line and config files of every settings dataclass (`TrainConfig`, `ChatConfig`,
`EvalConfig`).

Each field is declared with `dpo_core.setting.setting` (default, help, group); `build_parser`
makes one flag per field, grouped for `--help`, and `parse_config` fills the dataclass from the
flags, a `--config` YAML/JSON file and presets, in that order of precedence. Torch-free, so
`--help` and flag errors load no heavy module.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from typing import Any

from dpo_core.config.trl_names import from_trl_names
from dpo_core.console import logger
from dpo_core.errors import ConfigError
from dpo_core.run_files import RUN_PLAN_KEY

# Choices shared by train.py, chat.py and the modules that act on them.
QUANTIZATION_MODES = ("auto", "4bit", "none")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
CHAT_TEMPLATE_MODES = ("auto", "none")
TRACKERS = ("none", "tensorboard", "wandb")


def check_finite(config: Any) -> None:
    """Every float setting of a config dataclass must be a finite number: argparse's float()
    takes 'nan' and 'inf', which no setting here can use."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number, got {value}")


def check_writable_dir(flag: str, path: str) -> None:
    """`path` is, or can be created as, a directory this process can write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file, not a directory; choose another path")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path!r}: {existing!r} is a file, so no directory can be "
                          "made there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: {existing!r} is not writable; choose a directory "
                          "you can write to")


def build_parser(cls: type, description: str, epilog: str | None = None,
                 config_file: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, grouped by the field's metadata
    (`setting(..., group)`), and with `config_file` a `--config PATH` flag for a YAML/JSON
    file of the same settings.

    Defaults are suppressed in the namespace so that `parse_config` can tell which flags the
    user gave (the config file and the demo preset only fill in the others); `--help` still
    shows them.
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a misspelt flag is an error, not a silent prefix match
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config_file:
        parser.add_argument(
            "--config", metavar="PATH",
            help="YAML or JSON file of settings, keyed by the flag names below without '--' "
                 "(a finished run's training_config.json works). Flags on the command line "
                 "override it.")
    # Flags in the class's HELP_GROUPS order (a dataclass lists inherited fields first), then
    # any other group's; within a group, in field order.
    order = getattr(cls, "HELP_GROUPS", ())
    groups = {name: parser.add_argument_group(name) for name in order}
    ranked = sorted(dataclasses.fields(cls), key=lambda f: order.index(f.metadata["group"])
                    if f.metadata["group"] in order else len(order))  # stable within a group
    for f in ranked:
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = dict(meta["argparse"])
        if kwargs.pop("positional", False):  # a required operand, e.g. dpo-eval's RUN_DIR
            group.add_argument(f.name, metavar=f.name.upper(), help=meta["help"], **kwargs)
            continue
        help_text = f"{meta['help']} (default: {f.default})"
        names = [f"--{name}" for name in (f.name, *meta.get("aliases", ()))]
        if f.type in ("bool", bool, "bool | None"):
            # --flag / --no-flag unless the default is off; None means "decide at run time".
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            group.add_argument(*names, dest=f.name, action=action, help=help_text, **kwargs)
            continue
        group.add_argument(*names, dest=f.name, type=_field_type(f), help=help_text, **kwargs)
    return parser


def _field_type(f: dataclasses.Field) -> type:
    type_name = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "str": str}[type_name]


def load_config_file(path: str, cls: type) -> dict[str, Any]:
    """The settings in a YAML or JSON file (JSON is read as YAML too), keyed by field name of
    `cls` or by trl's name for it (`dpo_core.config.trl_names`: a trl-style DPOConfig YAML;
    each key mapped is said once), and type-checked like the flags; ConfigError naming the
    file and the key (and the closest valid key) for anything else."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML or JSON ({error})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, "
                          f"got a {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    try:
        values, notices = from_trl_names(values, set(fields), f"--config {path}")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if notices:
        logger.info(f"--config {path}: read trl's names as this program's: "
                    f"{'; '.join(notices)}.")
    settings = {}
    for key, value in values.items():
        if key == RUN_PLAN_KEY:
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown setting {key!r}{hint}")
        settings[key] = _checked_value(fields[key], value, f"--config {path}: {key}")
    return settings


def _checked_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    type_name = str(f.type)
    if value is None:
        if "None" in type_name:
            return None
        raise ConfigError(f"{where} cannot be null")
    base = type_name.replace(" | None", "")
    if base == "str" and isinstance(value, list) and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        # Comma-separated settings (--loss_type, --loss_weights, --lora_target_modules) may
        # be written as YAML lists.
        value = ",".join(str(v) for v in value)
    if base in ("int", "float") and isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string; take numbers written as on the command line.
        try:
            value = {"int": int, "float": float}[base](value)
        except ValueError:
            pass
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool),
          "str": isinstance(value, str)}[base]
    if not ok:
        raise ConfigError(f"{where} must be {'a' if base != 'int' else 'an'} {base}, "
                          f"got {value!r}")
    choices = f.metadata["argparse"].get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if base == "float" else value


def parse_config(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None = None,
                 presets: Callable[[dict], dict] | None = None) -> Any:
    """`cls` from, in order of precedence: the flags given on the command line, the
    `--config` file, `presets(settings so far)` (e.g. the demo's settings when those ask for
    the demo), and the field defaults."""
    explicit = vars(parser.parse_args(argv))
    path = explicit.pop("config", None)
    settings = {**(load_config_file(path, cls) if path else {}), **explicit}
    return cls(**{**(presets(settings) if presets else {}), **settings})
