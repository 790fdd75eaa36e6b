"""README.md and docs/*.md against the code they describe. Nothing is trained or run.

The rules checked, for every one of those files:

1. Commands. In each fenced block tagged bash, sh, shell, console or untagged, every logical
   line (lines joined at a trailing backslash, a leading "$ " prompt and "# ..." comments
   dropped, split at the separators &&, ||, ; and | written as words, leading VAR=value words
   dropped) that runs this project must parse, through the project's own parsers:
   - `python train.py` / `dpo-train`, `python chat.py` / `dpo-chat`: `dpo_core.cli.train_parser`
     / `chat_parser` and `parse_config`, which also reads a `--config` file and checks its keys
     and types (`validate()` is not called: it needs the named model and data to exist);
   - `dpo-report` / `python -m dpo_core.reporting`: `dpo_core.cli.report_parser()`;
   - `dpo-eval` / `python -m dpo_core.evaluate`: `dpo_core.cli.eval_parser()` and `parse_config`;
   - `accelerate launch` / `torchrun`: the launcher's own parser, then the script (or `-m`
     module) it starts with its arguments, as above;
   - `python -m benchmarks.X`, `python benchmarks/X.py`, `python scripts/X.py`: the parser the
     module's `main` builds, caught at its `parse_args` call (nothing after it runs);
   - any other `python -m M` / `python FILE.py`: M is importable, FILE exists;
   - `make T`: T is a Makefile target; `pip install '.[E]'`: E is an extra in setup.cfg;
     `bash FILE`: FILE exists.
   A shell variable (`$NODE_RANK`, `"$MAIN_IP"`) stands for a value and is read as 0.
   The word `...` stands for more arguments and is dropped; other placeholders (`OUTPUT_DIR`,
   `runs/mine`) are fine values. A `--config` or `--config_file` value must be a file in the
   repository unless it is a placeholder (holds `<` or an UPPER_CASE word). Lines that run
   something else (`cd`, `tensorboard`, program output) are not checked.
2. Flags. Every `--flag` written anywhere (prose, tables, code) is a flag of train.py,
   chat.py, dpo-report or dpo-eval, or of a tool named in the same paragraph (lines up to a
   blank line; a table is one paragraph): a benchmark module (`benchmarks.X` or
   `benchmarks/X.py`), accelerate or torchrun (their own parsers), or a tool in EXTERNAL_FLAGS.
   `--name_*` stands for the flags that start with `--name_`.
3. References. A code span that is a repository path (under dpo_core/, tests/, benchmarks/,
   examples/, scripts/, docs/, or a top-level file such as train.py) exists; a dotted
   `dpo_core.x.y` / `benchmarks.x` names a module and, after it, a top-level name in that
   module; a relative link's file exists and its #anchor is one of that file's headings.
4. README.md has at most 250 lines, docs/README.md links every page in docs/, and every flag
   of train.py, chat.py, dpo-report and dpo-eval is documented somewhere.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import re
import shlex
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
from conftest import ROOT

from dpo_core import cli
from dpo_core.config.chat import ChatConfig
from dpo_core.config.evaluation import EvalConfig
from dpo_core.config.fields import parse_config
from dpo_core.config.train import TrainConfig
from dpo_core.errors import UserError

DOCS = ["README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
    if name.endswith(".md"))
README_MAX_LINES = 250
COMMAND_BLOCKS = {"", "bash", "sh", "shell", "console"}
# Flags of tools with no parser to ask, keyed by the word that names the tool in a paragraph.
EXTERNAL_FLAGS = {
    "tensorboard": {"--logdir"},  # tensorboard --logdir DIR
    # the #SBATCH lines of a Slurm script
    "SBATCH": {"--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--output"},
}
REPO_DIRS = ("dpo_core/", "tests/", "benchmarks/", "examples/", "scripts/", "docs/", ".ci/")
REPO_FILES = {"train.py", "chat.py", "Makefile", "setup.cfg", "pyproject.toml", "ruff.toml"}
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)(\*?)")
BENCHMARK_NAMED = re.compile(r"\bbenchmarks[./](\w+)")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "2>", "2>>", "<", "&>"}


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


# -- markdown ---------------------------------------------------------------------------------
def fenced_blocks(text: str) -> Iterator[tuple[str, list[str]]]:
    """(language tag, lines) of every fenced code block."""
    lang, lines = None, []
    for line in text.splitlines():
        fence = re.match(r"\s*(```|~~~)\s*(\S*)", line)
        if lang is None and fence:
            lang, lines = fence.group(2), []
        elif lang is not None and fence:
            yield lang, lines
            lang = None
        elif lang is not None:
            lines.append(line)


def without_fenced_blocks(text: str) -> str:
    kept, inside = [], False
    for line in text.splitlines():
        if re.match(r"\s*(```|~~~)", line):
            inside = not inside
            kept.append("")
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


def paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for line in without_fenced_blocks(text).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            title = heading.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


# -- the parsers --------------------------------------------------------------------------------
class _ParserBuilt(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


@functools.cache
def parser_built_by(module_name: str) -> argparse.ArgumentParser:
    """The argparse parser `module.main` builds, taken when it calls `parse_args` (so nothing
    of the command runs). `module_name` is a dotted module or a path to a script."""
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("doc_script", os.path.join(ROOT, module_name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)

    def stop(self, *args, **kwargs):
        raise _ParserBuilt(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            module.main([])
        except _ParserBuilt as built:
            return built.parser
    raise AssertionError(f"{module_name}: main() returned without parsing its arguments")


@functools.cache
def launcher_parser(tool: str) -> argparse.ArgumentParser:
    if tool == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        return launch_command_parser()
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


@functools.cache
def project_flags() -> frozenset[str]:
    return frozenset(flags_of(cli.train_parser()) | flags_of(cli.chat_parser())
                     | flags_of(cli.report_parser()) | flags_of(cli.eval_parser()))


@functools.cache
def makefile_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", read("Makefile"), re.M))


@functools.cache
def package_extras() -> frozenset[str]:
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    return frozenset(setup["options.extras_require"])


def spelling_problems(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """argparse takes any unambiguous prefix of a flag (`--learning_rat`); docs spell flags
    out."""
    known = flags_of(parser)
    return [f"{word.split('=')[0]}: not a flag's full name" for word in args
            if word.startswith("--") and word != "--" and word.split("=")[0] not in known]


def problem_of(parse: Callable[[], object]) -> str | None:
    """None if `parse()` accepts its arguments, else argparse's or the project's message."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parse()
    except SystemExit as stop:
        if stop.code not in (0, None):
            return (errors.getvalue().strip().splitlines() or [f"exit {stop.code}"])[-1]
    except UserError as error:
        return str(error)
    return None


# -- rule 1: commands ---------------------------------------------------------------------------
def is_placeholder(value: str) -> bool:
    return "<" in value or re.search(r"\b[A-Z][A-Z0-9_]{2,}\b", value) is not None


def config_file_problems(words: list[str], flag: str) -> tuple[list[str], list[str]]:
    """(problems, words without placeholder `flag` values): a `flag FILE` must name a file in
    the repository unless FILE is a placeholder, which is then left out of what is parsed."""
    problems, kept, i = [], [], 0
    while i < len(words):
        word = words[i]
        name, _, value = word.partition("=")
        if name == flag and (value or i + 1 < len(words)):
            path, step = (value, 1) if value else (words[i + 1], 2)
            if is_placeholder(path):
                i += step
                continue
            if not os.path.isfile(os.path.join(ROOT, path)):
                problems.append(f"{flag} {path}: no such file in the repository")
        kept.append(word)
        i += 1
    return problems, kept


def settings_problems(config_class: type, parser: argparse.ArgumentParser,
                      args: list[str]) -> list[str]:
    problems, args = config_file_problems(args, "--config")
    chat = config_class is ChatConfig
    problem = problem_of(lambda: parse_config(
        config_class, parser, args,
        presets=lambda settings: cli.demo_presets(settings, chat=chat)))
    return problems + ([problem] if problem else spelling_problems(parser, args))


def script_problems(script: str, args: list[str]) -> list[str]:
    """`python SCRIPT args` (also what a launcher starts)."""
    if script in ("train.py", "dpo-train"):
        return settings_problems(TrainConfig, cli.train_parser(), args)
    if script in ("chat.py", "dpo-chat"):
        return settings_problems(ChatConfig, cli.chat_parser(), args)
    if script == "dpo-report":
        return parser_problems(cli.report_parser(), args)
    if script == "dpo-eval":
        return settings_problems(EvalConfig, cli.eval_parser(), args)
    if not os.path.isfile(os.path.join(ROOT, script)):
        return [f"{script}: no such file"]
    if script.startswith(("benchmarks/", "scripts/")):
        module = script if script.startswith("scripts/") else script[:-3].replace("/", ".")
        return module_problems(module, args)
    return []


def module_problems(module: str, args: list[str]) -> list[str]:
    """`python -m MODULE args`."""
    if module == "dpo_core.reporting":
        return script_problems("dpo-report", args)
    if module == "dpo_core.evaluate":
        return script_problems("dpo-eval", args)
    if module.startswith("benchmarks.") or module.endswith(".py"):
        if not module.endswith(".py") and importlib.util.find_spec(module) is None:
            return [f"python -m {module}: no such module"]
        return [f"{module}: {p}" for p in parser_problems(parser_built_by(module), args)]
    if module == "pip":
        return pip_problems(args)
    if importlib.util.find_spec(module) is None:
        return [f"python -m {module}: no such module"]
    return []


def parser_problems(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    problem = problem_of(lambda: parser.parse_args(args))
    return [problem] if problem else spelling_problems(parser, args)


def launcher_problems(tool: str, args: list[str]) -> list[str]:
    problems, args = config_file_problems(args, "--config_file")
    launched: list[argparse.Namespace] = []
    problem = problem_of(lambda: launched.append(launcher_parser(tool).parse_args(args)))
    if problem:
        return problems + [f"{tool}: {problem}"]
    script, script_args = launched[0].training_script, launched[0].training_script_args
    own_args = [a for a in args[:len(args) - len(script_args) - 1] if a != "-m"]
    started = (module_problems(script, script_args) if getattr(launched[0], "module", False)
               else script_problems(script, script_args))
    return (problems + [f"{tool}: {p}" for p in spelling_problems(launcher_parser(tool), own_args)]
            + started)


def pip_problems(args: list[str]) -> list[str]:
    if args[:1] != ["install"]:
        return []
    return [f"pip install: no extra {extra!r} in setup.cfg" for word in args
            for extras in re.findall(r"\.\[([\w,-]+)\]", word) for extra in extras.split(",")
            if extra not in package_extras()]


def simple_command_problems(words: list[str]) -> list[str]:
    while words and re.match(r"[A-Za-z_]\w*=", words[0]):
        words = words[1:]
    words = ["0" if re.fullmatch(r"\$\{?\w+\}?", w) else w for w in words if w != "..."]
    if not words:
        return []
    program, args = os.path.basename(words[0]), words[1:]
    if re.fullmatch(r"python3?", program):
        if args[:1] == ["-m"] and len(args) > 1:
            return module_problems(args[1], args[2:])
        if args and args[0].endswith(".py"):
            return script_problems(args[0], args[1:])
        return []
    if program in ("dpo-train", "dpo-chat", "dpo-report", "dpo-eval"):
        return script_problems(program, args)
    if program == "accelerate" and args[:1] == ["launch"]:
        return launcher_problems("accelerate", args[1:])
    if program == "torchrun":
        return launcher_problems("torchrun", args)
    if program == "make":
        return [f"make {t}: no such target in the Makefile" for t in args
                if "=" not in t and not t.startswith("-") and t not in makefile_targets()]
    if program in ("pip", "pip3"):
        return pip_problems(args)
    if program in ("bash", "sh") and args and not os.path.isfile(os.path.join(ROOT, args[0])):
        return [f"{program} {args[0]}: no such file"]
    return []


def logical_lines(lines: list[str]) -> Iterator[str]:
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def command_problems(text: str) -> list[str]:
    problems = []
    for lang, block in fenced_blocks(text):
        if lang not in COMMAND_BLOCKS:
            continue
        for line in logical_lines(block):
            line = re.sub(r"^\s*\$ ", "", line)
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # program output with an apostrophe, not a command
                continue
            command: list[str] = []
            for word in [*words, ";"]:
                if word in SEPARATORS:
                    found = simple_command_problems(command)
                    problems += [f"{line.strip()}\n    -> {p}" for p in found]
                    command = []
                elif command and command[-1] in REDIRECTIONS:
                    command.pop()  # the redirection and its target
                else:
                    command.append(word)
    return problems


# -- rule 2: flags --------------------------------------------------------------------------
def tool_flags(paragraph: str) -> set[str]:
    """Flags of the tools a paragraph names, beyond train.py's, chat.py's and dpo-report's."""
    flags = set()
    for module in set(BENCHMARK_NAMED.findall(paragraph)):
        if importlib.util.find_spec(f"benchmarks.{module}") is not None and hasattr(
                importlib.import_module(f"benchmarks.{module}"), "main"):
            flags |= flags_of(parser_built_by(f"benchmarks.{module}"))
    for tool in ("accelerate", "torchrun"):
        if re.search(rf"\b{tool}\b", paragraph):
            flags |= flags_of(launcher_parser(tool))
    for tool, known in EXTERNAL_FLAGS.items():
        if re.search(rf"\b{tool}\b", paragraph):
            flags |= known
    return flags


def flag_problems(text: str) -> list[str]:
    problems = []
    for paragraph in paragraphs(text):
        mentioned = FLAG.findall(paragraph)
        if not mentioned:
            continue
        known = project_flags() | tool_flags(paragraph)
        for flag, wildcard in mentioned:
            ok = (any(k.startswith(flag) for k in known) if wildcard else flag in known)
            if not ok:
                where = paragraph.strip().splitlines()[0][:80]
                problems.append(f"{flag}{wildcard}: not a flag of train.py, chat.py, "
                                f"dpo-report or a tool named with it (paragraph {where!r})")
    return problems


# -- rule 3: references -----------------------------------------------------------------------
def top_level_names(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_name_problem(name: str) -> str | None:
    """`dpo_core.a.b.NAME`: the longest prefix that is a module exists, and the next part is a
    submodule or a top-level name of it (what follows, attributes of that object, is not
    checked)."""
    parts, path = name.split("."), ROOT
    for i, part in enumerate(parts):
        package, module = os.path.join(path, part), os.path.join(path, part + ".py")
        if os.path.isfile(os.path.join(package, "__init__.py")):
            path = package
            continue
        if os.path.isfile(module):
            rest = parts[i + 1:]
            if rest and rest[0] not in top_level_names(module):
                return f"{name}: {'.'.join(parts[:i + 1])} has no {rest[0]!r}"
            return None
        if i > 0 and part in top_level_names(os.path.join(path, "__init__.py")):
            return None
        return f"{name}: no module {'.'.join(parts[:i + 1])}"
    return None


def reference_problems(text: str, doc: str) -> list[str]:
    problems = []
    prose = without_fenced_blocks(text)
    for span in re.findall(r"`([^`]+)`", prose):
        span = span.strip()
        if re.search(r"[<*{\s]", span):
            continue  # a placeholder, a pattern or a command line
        if span.startswith(REPO_DIRS) or span in REPO_FILES:
            if not os.path.exists(os.path.join(ROOT, span)):
                problems.append(f"`{span}`: no such path in the repository")
        elif re.fullmatch(r"(dpo_core|benchmarks)(\.\w+)+", span):
            problem = dotted_name_problem(span)
            if problem:
                problems.append(f"`{span}`: {problem}")
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # http:, mailto:
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else \
            os.path.join(ROOT, doc)
        if not os.path.exists(full):
            problems.append(f"link {target}: no such file")
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                if anchor not in heading_anchors(f.read()):
                    problems.append(f"link {target}: no heading #{anchor} there")
    return problems


# -- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS)
def test_every_command_block_parses(doc):
    assert not command_problems(read(doc)), "\n".join(command_problems(read(doc)))


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_named_exists(doc):
    problems = flag_problems(read(doc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_module_and_link_resolves(doc):
    problems = reference_problems(read(doc), doc)
    assert not problems, "\n".join(problems)


def test_readme_is_a_short_page():
    assert len(read("README.md").splitlines()) <= README_MAX_LINES


def test_the_docs_index_links_every_page():
    index = read(os.path.join("docs", "README.md"))
    pages = {os.path.basename(d) for d in DOCS if d.startswith("docs") and
             not d.endswith("README.md")}
    assert pages, "no pages in docs/"
    assert not {p for p in pages if f"]({p})" not in index}


def test_the_package_map_lists_every_module():
    """docs/architecture.md's package map names every module of dpo_core, or the package that
    holds it (a new module added without its row is how the map drifts)."""
    page = read(os.path.join("docs", "architecture.md"))
    modules = {os.path.join(root, name).replace(os.sep, "/")
               for root, _, names in os.walk("dpo_core") for name in names
               if name.endswith(".py") and name != "__init__.py"}
    assert modules
    assert not {m for m in modules
                if f"`{m}`" not in page and f"`{os.path.dirname(m)}/`" not in page}


def test_every_flag_is_documented():
    written = {flag for doc in DOCS for flag, _ in FLAG.findall(read(doc))}
    # A switch's --no- form need not be written out; --help is argparse's.
    flags = {f for f in project_flags() if not f.startswith("--no-")} - {"--help"}
    assert not flags - written


# Each rule fails on a typical mistake and accepts the correct spelling: (text, is it wrong).
FLAG_CASES = [
    ("Lower `--learning_rat` if the loss diverges.", True),
    ("Lower `--learning_rate` if the loss diverges.", False),
    ("the `--lora_x*` flags", True),
    ("the `--lora_*` flags", False),
    ("Pass `--preset cpu-small`.", True),  # a benchmark's flag, the benchmark not named
    ("`python -m benchmarks.bench_dpo` takes `--preset cpu-small`.", False),
    ("Don't use `accelerate launch --cpu` here.", False),
]
COMMAND_CASES = [
    ("python train.py --learning_rat 1e-5", True),  # argparse would take the prefix
    ("python train.py --batch_size two", True),
    ("python train.py --dtype float8", True),
    ("python train.py \\\n    --no-learning_rate", True),
    ("python train.py \\\n    --learning_rate 1e-5  # lower", False),
    ("python train.py --config examples/configs/missing.yaml", True),
    ("python train.py --config OUTPUT_DIR/training_config.json", False),
    ("python chat.py --temperture 0", True),
    ("dpo-report run_a run_b run_c", True),
    ("accelerate launch --multi_gpuu train.py", True),
    ("accelerate launch --multi_gp train.py", True),
    ("accelerate launch --num_processes 2 train.py --bta 0.1", True),
    ("accelerate launch train.py --learning_rat 1e-5", True),
    ("torchrun --nproc_per_node 2 train.py --bta 0.1", True),
    ("python -m benchmarks.bench_dpo --presett tiny", True),
    ("python -m benchmarks.no_such_bench", True),
    ("python scripts/build_demo_assets.py --threads 1", False),
    ("python scripts/build_demo_assets.py --thread 1", True),
    ("python scripts/no_such_script.py", True),
    ("make no_such_target", True),
    ("cd somewhere && make tset", True),
    ("pip install -e '.[no_such_extra]'", True),
    ("make setup TORCH=torch && .venv/bin/python -m pytest -q", False),
]
REFERENCE_CASES = [
    ("See `dpo_core/report.py`.", True),
    ("See `dpo_core/reporting/curves.py`.", False),
    ("`dpo_core.report`", True),
    ("`dpo_core.losses.options.NO_SUCH_TABLE`", True),
    ("`dpo_core.losses.options.LOSSES`", False),
    ("[losses](losses.md#no-such-heading)", True),
    ("[gone](gone.md)", True),
    ("[metrics](losses.md#metrics)", False),
]


@pytest.mark.parametrize("text, wrong", FLAG_CASES)
def test_flag_check_catches_mistakes(text, wrong):
    assert bool(flag_problems(text)) == wrong


@pytest.mark.parametrize("command, wrong", COMMAND_CASES)
def test_command_check_catches_mistakes(command, wrong):
    assert bool(command_problems(f"```bash\n{command}\n```\n")) == wrong


def test_command_check_skips_program_output():
    assert not command_problems("```\nRun plan: (asked: --max_steps 2) it's output\n```\n")


@pytest.mark.parametrize("text, wrong", REFERENCE_CASES)
def test_reference_check_catches_mistakes(text, wrong):
    assert bool(reference_problems(text, os.path.join("docs", "example.md"))) == wrong
