"""DPO training speed and memory: this project's trainer, flag by flag, side by side with trl.

Builds a randomly initialised Llama of a preset shape and synthetic preference data
(`benchmarks/synthetic.py`), then trains a fixed number of steps with LoRA r 16 on all linear
layers, once per variant, each variant in a fresh process (`benchmarks/worker.py`, so peak
memory is that variant's own). Every variant runs the real training code:
`dpo_core.trainer.train` with a `TrainConfig`, or trl's `DPOTrainer` for `--compare trl`.
Variants run in interleaved rounds and are reported as medians; FLOPs and MFU come from
`benchmarks/flops.py`.

    python -m benchmarks.bench_dpo --preset cpu-small --data ultrafeedback --compare trl \\
        --json bench.json --markdown bench.md --plot bench.png

What the numbers mean: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.flops import matmul_peak_flops, pair_train_flops, reference_flops
from benchmarks.synthetic import (
    DATA_PRESETS,
    LORA_R,
    MODEL_PRESETS,
    REALISTIC_DATA,
    REALISTIC_PAIRS,
    RUN_DEFAULTS,
    SEED,
    ModelShape,
    build_assets,
    max_prompt_length_for,
)

ROOT = Path(__file__).resolve().parents[1]

def _ours(padding_free: bool, prefix: bool, precompute: bool, checkpointing: bool = False,
          **more) -> tuple[str, dict]:
    return ("ours", {"padding_free": padding_free, "prefix_sharing": prefix,
                     "precompute_ref_log_probs": precompute,
                     "gradient_checkpointing": checkpointing, **more})


# name -> (trainer, settings). "ours" settings are TrainConfig fields.
VARIANTS = {
    "standard": _ours(False, False, False),
    "prefix": _ours(False, True, False),
    "precompute": _ours(False, False, True),
    "prefix+precompute": _ours(False, True, True),
    "checkpointing": _ours(False, False, False, checkpointing=True),
    "prefix+precompute+checkpointing": _ours(False, True, True, checkpointing=True),
    "grouped": _ours(False, True, True, group_by_length=True),
    "padding-free": _ours(True, False, False),
    "padding-free+prefix": _ours(True, True, False),
    "padding-free+precompute": _ours(True, False, True),
    "padding-free+prefix+precompute": _ours(True, True, True),
    # Padded rows, the other speed flags at their defaults: this trainer's defaults before
    # padding-free batches.
    "padded-auto": ("ours", {"padding_free": False, "gradient_checkpointing": False}),
    # TrainConfig's own defaults for every speed flag, gradient checkpointing included.
    "defaults": ("ours", {}),
    # The speed flags at their defaults (decided at run time), gradient checkpointing off.
    "auto": ("ours", {"gradient_checkpointing": False}),
    # auto with glibc's malloc left at its defaults (freed memory returned to the kernel).
    "auto+system-malloc": ("ours", {"gradient_checkpointing": False,
                                    "reuse_host_memory": False}),
    # The standard path of another revision of this project (`--baseline REV`): the same
    # padded, per-step-reference settings, with flags that revision lacks left out.
    "baseline": _ours(False, False, False),
    "trl": ("trl", {"gradient_checkpointing": False}),
    "trl+checkpointing": ("trl", {"gradient_checkpointing": True}),
}
DEFAULT_VARIANTS = ("standard,prefix+precompute,padding-free,padding-free+prefix,"
                    "padding-free+prefix+precompute,auto,defaults")
# Variants that must reproduce the standard path's losses (same batches, same math).
EXACT_VARIANTS = ("prefix", "precompute", "prefix+precompute", "checkpointing",
                  "prefix+precompute+checkpointing", "padding-free", "padding-free+prefix",
                  "padding-free+precompute", "padding-free+prefix+precompute", "padded-auto",
                  "defaults", "auto", "auto+system-malloc", "baseline")




def machine_description() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                   if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info



# ------------------------------------------------------------------ what the trainers see


def visiting_order(spec: dict) -> dict:
    """Our trainer's tokenized pairs in the order its first epoch visits them: their (P, C, R)
    lengths, the row of the data file each came from (so trl is fed the same batches), and how
    many of them the trainer's truncation shortened."""
    import torch

    from dpo_core.config.train import TrainConfig
    from dpo_core.data.batches import epoch_order
    from dpo_core.data.pairs import to_pair
    from dpo_core.data.templates import resolve_chat_template
    from dpo_core.data.tokenization import tokenize_pairs, truncate
    from dpo_core.data.training_data import build_training_data
    from dpo_core.modeling.loading import load_tokenizer

    config = TrainConfig(model_name=spec["model_dir"], dataset_name=spec["data_path"],
                         num_samples=0, eval_fraction=0.0, seed=SEED,
                         max_length=spec["max_length"],
                         max_prompt_length=spec["max_prompt_length"],
                         chat_template=spec["chat_template"], num_sample_prompts=0)
    tokenizer = load_tokenizer(spec["model_dir"])
    use_chat_template = resolve_chat_template(tokenizer, spec["chat_template"])
    pairs = build_training_data(config, tokenizer, use_chat_template, show_progress=False).train
    order = epoch_order(len(pairs), spec["batch_size"], torch.Generator().manual_seed(SEED))
    with open(spec["data_path"]) as f:  # each row as the trainer's loader reads it
        file_pairs = [to_pair(json.loads(line), f"line {n}") for n, line in enumerate(f, 1)]
    whole, _ = tokenize_pairs(tokenizer, file_pairs, max_length=10**9,
                              max_prompt_length=10**9 - 1, use_chat_template=use_chat_template,
                              disable=True)
    truncated = [truncate(p.prompt_ids, p.chosen_ids, p.rejected_ids, spec["max_length"],
                          spec["max_prompt_length"]) for p in whole]

    def key(pair) -> tuple:
        return (tuple(pair.prompt_ids), tuple(pair.chosen_ids), tuple(pair.rejected_ids))

    row_of = {key(pair): index for index, pair in enumerate(truncated)}
    rows = [row_of[key(pairs[i])] for i in order]
    return {
        "segments": [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]
                     for p in (pairs[i] for i in order)],
        "rows": rows,
        "truncated_pairs": sum(key(truncated[i]) != key(whole[i]) for i in range(len(whole))),
        # Untruncated ids per visited pair, for the token-id comparison with trl.
        "token_ids": [[list(ids) for ids in key(whole[row])] for row in rows],
    }


def token_id_agreement(ours: list, theirs: list) -> dict:
    """Per row: are trl's prompt, chosen and rejected ids (before its truncation) ours?"""
    differing = [index for index, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    parts = ("prompt", "chosen", "rejected")
    return {
        "rows": len(ours), "identical_rows": len(ours) - len(differing),
        "differing_rows": differing[:10],
        "differing_parts": {part: sum(ours[i][k] != theirs[i][k] for i in differing)
                            for k, part in enumerate(parts)},
        # The first differing row's differing parts, ours then trl's.
        "first_difference": {part: {"ours": ours[differing[0]][k],
                                    "trl": theirs[differing[0]][k]}
                             for k, part in enumerate(parts)
                             if ours[differing[0]][k] != theirs[differing[0]][k]}
        if differing else None,
    }


def processed_positions(trainer: str, config: dict, batch: list[list[int]]) -> tuple[int, int]:
    """(positions one training forward processes for this batch of (P, C, R) pairs, how many
    of them are real tokens): padded rows are as wide as the batch's widest, a packed row
    holds real tokens only. Padding-free unset resolves to on (these runs use SDPA)."""
    padding_free = trainer == "ours" and config.get("padding_free") is not False
    prefix = trainer == "ours" and (config.get("prefix_sharing") is not False if padding_free
                                    else uses_prefix_sharing(config.get("prefix_sharing"),
                                                             batch))
    real = sum(p + c + r if prefix else 2 * p + c + r for p, c, r in batch)
    if padding_free:
        return real, real
    if prefix:
        return len(batch) * max(p + c + r for p, c, r in batch), real
    return 2 * len(batch) * max(p + max(c, r) for p, c, r in batch), real


# ------------------------------------------------------------------ orchestration


def wait_until_quiet(max_busy: float, timeout_s: float) -> float:
    """Wait (at most `timeout_s`) until the CPUs are less than `max_busy` busy over one second
    (this process idles meanwhile, so the load is other processes'); return the last reading."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy
        time.sleep(4.0)


def export_revision(revision: str, workdir: Path) -> str:
    """This repository's tree at `revision` (any git revision), unpacked under `workdir`:
    the code the "baseline" variant imports `dpo_core` from."""
    found = subprocess.run(["git", "rev-parse", "--short", f"{revision}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"--baseline {revision}: not a commit of this repository "
                         f"({found.stderr.strip() or 'git failed'})")
    commit = found.stdout.strip()
    target = workdir / f"baseline-{commit}"
    if not (target / "dpo_core").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


def run_variant(name: str, base_spec: dict, workdir: Path) -> dict:
    trainer, settings = VARIANTS[name]
    spec = {**base_spec, "variant": name, "trainer": trainer, "settings": settings,
            "result_path": str(workdir / f"result-{name}.json")}
    if name != "baseline":
        spec.pop("checkout", None)
    spec_path = workdir / f"spec-{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run([spec["python"], "-m", "benchmarks.worker", str(spec_path)],
                               cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{completed.stdout[-3000:]}\n"
                           f"{completed.stderr[-5000:]}")
    return json.loads(Path(spec["result_path"]).read_text())


def uses_prefix_sharing(setting: bool | None, batch: list[list[int]]) -> bool:
    """Whether our trainer runs this batch of (P, C, R) pairs prefix-shared on padded rows:
    always, never, or (unset) by the trainer's own rule, `prefix_sharing_pays`."""
    import torch

    from dpo_core.forward.prefix_sharing import prefix_sharing_pays

    if setting is not None:
        return setting
    prompt, chosen, rejected = torch.tensor(batch).T
    return prefix_sharing_pays(prompt, prompt + chosen, prompt + rejected)


def summarise(name: str, results: list[dict], visited: dict, steps: int, batch_size: int,
              shape: ModelShape, peak_flops: float) -> dict:
    """Medians over the measured runs (one per round), throughput, FLOP/s and MFU from them;
    peak memory is the largest of the rounds."""
    trainer, _ = VARIANTS[name]
    runs = [result["run"] for result in results]
    config = runs[0]["config"]
    num_pairs = steps * batch_size
    segments = [visited["segments"][i % len(visited["segments"])] for i in range(num_pairs)]
    tokens = sum(2 * p + c + r for p, c, r in segments)
    # A precomputed reference is one pass over the distinct pairs, however many epochs follow.
    precomputed = runs[0]["reference_pass_s"] > 0
    flops, prefix_batches, positions, real_positions = 0.0, 0, 0, 0
    for start in range(0, num_pairs, batch_size):
        batch = segments[start:start + batch_size]
        processed, real = processed_positions(trainer, config, batch)
        positions, real_positions = positions + processed, real_positions + real
        prefix_shared = real < sum(2 * p + c + r for p, c, r in batch)
        prefix_batches += prefix_shared
        flops += sum(pair_train_flops(
            shape, s, prefix_shared=prefix_shared,
            checkpointing=config["gradient_checkpointing"], full_logits=trainer == "trl",
            reference=not precomputed)
            for s in batch)
        if precomputed:  # the first epoch's visits: each distinct pair once
            first_visits = batch[:max(0, len(visited["segments"]) - start)]
            flops += sum(reference_flops(shape, s, prefix_shared=prefix_shared, full_logits=False)
                         for s in first_visits)
    seconds = statistics.median(run["seconds"] for run in runs)
    achieved = flops / seconds
    peak_cuda = [r["peak_cuda_mb"] for r in results if r["peak_cuda_mb"] is not None]
    return {
        "variant": name, "trainer": trainer, "config": config,
        "prefix_shared_batches": prefix_batches,
        "seconds_median": seconds, "seconds_runs": [run["seconds"] for run in runs],
        "contention_runs": [run["contention"] for run in runs],
        "reference_pass_s_median": statistics.median(run["reference_pass_s"] for run in runs),
        "pairs_per_s": num_pairs / seconds, "tokens_per_s": tokens / seconds,
        "tokens": tokens, "pairs": num_pairs, "processed_positions": positions,
        "padding_fraction": 1 - real_positions / positions,
        "flops_per_s": achieved, "mfu": achieved / peak_flops if peak_flops else None,
        "peak_memory_mb": max(peak_cuda) if peak_cuda else max(r["peak_rss_mb"] for r in results),
        "peak_memory_kind": "cuda max_memory_allocated" if peak_cuda else "RSS (VmHWM)",
        "baseline_rss_mb": statistics.median(r["baseline_rss_mb"] for r in results),
        "code": runs[0].get("code"),
        "settings_left_out": runs[0].get("settings_left_out", []),
        "first_step": runs[0]["first_step"],
        "losses": runs[0]["losses"],
        "load_runs": [run.get("loadavg") for run in runs],
        "system_cpu_s_runs": [run["system_cpu_s"] for run in runs],
        "page_faults_runs": [run["page_faults"] for run in runs],
        "token_ids": runs[0].get("token_ids"),
    }


def compare(rows: dict[str, dict]) -> dict:
    """Agreement checks and speed-ups: exact variants vs standard, ours vs trl."""
    checks = {}
    standard = rows.get("standard")
    if standard:
        for name in EXACT_VARIANTS:
            if name in rows:
                diff = max(abs(a - b) for a, b in zip(rows[name]["losses"], standard["losses"],
                                                      strict=True))
                checks[f"{name} vs standard: max |loss diff| over all steps"] = diff
    ratios = {}
    for name, row in rows.items():
        if standard and name != "standard" and row["trainer"] == "ours":
            ratios[f"{name} / standard tokens/s"] = row["tokens_per_s"] / standard["tokens_per_s"]
    pairings = [("standard", "trl"), ("checkpointing", "trl+checkpointing"),
                ("padded-auto", "trl"),
                ("defaults", "trl+checkpointing"), ("auto", "trl"), ("prefix+precompute", "trl"),
                ("prefix+precompute+checkpointing", "trl+checkpointing")]
    for ours, theirs in pairings:
        if ours in rows and theirs in rows:
            a, b = rows[ours], rows[theirs]
            ratios[f"{ours} / {theirs} tokens/s"] = a["tokens_per_s"] / b["tokens_per_s"]
            ratios[f"{ours} / {theirs} peak memory"] = a["peak_memory_mb"] / b["peak_memory_mb"]
            for key in ("loss", "logps/chosen", "logps/rejected"):
                checks[f"{ours} vs {theirs}: first-step {key} diff"] = abs(
                    a["first_step"][key] - b["first_step"][key])
            checks[f"{ours} vs {theirs}: max |loss diff| over all steps"] = max(
                abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
    return {"checks": checks, "ratios": ratios}


def format_table(rows: dict[str, dict]) -> str:
    header = ("| variant | pairs/s | tokens/s | x standard | padding | peak MB | GFLOP/s | MFU | "
              "first-step loss | ref pass s | runs: s (others' CPU, loadavg) |")
    lines = [header, "|" + "---|" * 11]
    standard = rows.get("standard")
    for name, row in rows.items():
        speedup = f"{row['tokens_per_s'] / standard['tokens_per_s']:.2f}" if standard else "-"
        runs = ", ".join(
            f"{s:.2f} ({100 * c:.0f}%, {load if load is not None else '-'})"
            for s, c, load in zip(row["seconds_runs"], row["contention_runs"], row["load_runs"],
                                  strict=True))
        mfu = f"{100 * row['mfu']:.0f}%" if row["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:.0f} | {speedup} | "
            f"{100 * row['padding_fraction']:.0f}% | {row['peak_memory_mb']:.0f} | "
            f"{row['flops_per_s'] / 1e9:.1f} | {mfu} | {row['first_step']['loss']:.6f} | "
            f"{row['reference_pass_s_median']:.2f} | {runs} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["tab:gray" if rows[n]["trainer"] == "trl" else "tab:blue" for n in names]
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6))
    ax_speed.barh(names, [rows[n]["tokens_per_s"] for n in names], color=colors)
    ax_speed.set_xlabel("tokens/s (prompt+chosen + prompt+rejected), median")
    ax_memory.barh(names, [rows[n]["peak_memory_mb"] for n in names], color=colors)
    ax_memory.set_xlabel(f"peak memory, MB ({rows[names[0]]['peak_memory_kind']})")
    ax_memory.set_yticklabels([])
    for ax in (ax_speed, ax_memory):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_report(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"### {setup['preset']} / {setup['data']}: {setup['pairs']} pairs, max_length "
        f"{setup['max_length']}, batch {setup['batch_size']}, {setup['steps']} steps, "
        f"{setup['dtype']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} cores, torch "
        f"{report['machine']['torch']} ({report['machine']['torch_threads']} threads)"
        + (f", GPU {report['machine']['gpu']}" if report["machine"].get("gpu") else "")
        + f"; measured matmul peak {report['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
          f"({setup['dtype']}).",
        "",
        f"Data: mean prompt {setup['mean_prompt_tokens']:.0f} tokens, mean response "
        f"{setup['mean_response_tokens']:.0f} tokens; {setup['tokens']} DPO tokens per run. "
        f"Model: {setup['total_params'] / 1e6:.1f}M parameters "
        f"({setup['matmul_params'] / 1e6:.1f}M in matmuls).",
        "",
        f"Clock: {setup['clock']} time (torch threads: {setup['threads'] or 'default'}); "
        f"pairs the trainer's truncation shortened: {setup['truncated_pairs']}.",
        "",
        format_table(report["rows"]),
        "",
    ]
    if setup.get("baseline"):
        lines += [f"- baseline: the standard path of this project at revision "
                  f"`{setup['baseline']}`"]
    if "token_ids_vs_trl" in report:
        agreement = report["token_ids_vs_trl"]
        lines += [f"- token ids vs trl (prompt, chosen, rejected per row, before truncation): "
                  f"{agreement['identical_rows']} of {agreement['rows']} rows identical; "
                  f"differing parts {agreement['differing_parts']}"]
    lines += [f"- {key}: {value:.3g}" for key, value in report["ratios"].items()]
    lines += [f"- check, {key}: {value:.2e}" for key, value in report["checks"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(MODEL_PRESETS), default="cpu-small")
    parser.add_argument("--data", choices=list(DATA_PRESETS), default="short",
                        help="uniform lengths (short, prompt-heavy), UltraFeedback-shaped "
                             "(ultrafeedback), or those as chat messages through the chat "
                             "template (conversational)")
    parser.add_argument("--pairs", type=int, help="pairs in the data (preset default)")
    parser.add_argument("--max_length", type=int, help="tokens per sequence (preset default)")
    parser.add_argument("--batch_size", type=int, help="pairs per step (preset default)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each runs every variant once in a fresh process")
    parser.add_argument("--max_contention", type=float, default=0.1,
                        help="redo a run if other processes used more than this share of the "
                             "CPUs meanwhile (default 0.1)")
    parser.add_argument("--retries", type=int, default=2, help="redos per run (default 2)")
    parser.add_argument("--quiet_wait", type=float, default=120,
                        help="before each run, wait up to this many seconds for the CPUs to be "
                             "less busy than --max_contention (default 120)")
    parser.add_argument("--no_warmup", action="store_true",
                        help="skip the unmeasured one-step run before the measured ones "
                             "(smoke tests only: first-call costs then count)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--compare", choices=["trl"], help="add trl's DPOTrainer (GC off and on)")
    parser.add_argument("--baseline", metavar="REV",
                        help="add the 'baseline' variant: the standard path of this project at "
                             "git revision REV (e.g. the commit an issue's targets refer to), "
                             "run side by side with the others")
    parser.add_argument("--trl_python", default=sys.executable,
                        help="Python to run the trl variants with (one that has trl 1.16)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the trainers' timers read: wall time, or the worker's CPU "
                             "time (with --threads 1: robust on a shared, busy machine)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dpo-bench"))
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--markdown", help="write the table and checks here (markdown)")
    parser.add_argument("--plot", help="write a PNG of tokens/s and peak memory per variant")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compare == "trl":
        args.variants += [v for v in ("trl", "trl+checkpointing") if v not in args.variants]
    if args.baseline and "baseline" not in args.variants:
        args.variants.append("baseline")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "baseline" in args.variants and not args.baseline:
        parser.error("the baseline variant needs --baseline REV")
    return args


def base_spec(args: argparse.Namespace, workdir: Path) -> dict:
    """What every variant's worker gets: the assets and the run's shape."""
    import torch

    default_pairs, default_length, default_batch = RUN_DEFAULTS[args.preset]
    if args.data in REALISTIC_DATA:
        default_pairs = max(default_pairs, REALISTIC_PAIRS)
    pairs = args.pairs or default_pairs
    max_length = args.max_length or default_length
    batch_size = args.batch_size or default_batch
    dtype = args.dtype if args.dtype != "auto" else (
        "bfloat16" if torch.cuda.is_available() else "float32")
    # The baseline's tree first: a revision that is not there stops before anything is built.
    baseline = {"checkout": export_revision(args.baseline, workdir)} if args.baseline else {}
    print(f"Building {args.preset} model and {args.data} data in {workdir} ...", flush=True)
    return {**build_assets(args.preset, args.data, pairs, max_length, workdir),
            "pairs": pairs, "max_length": max_length,
            "max_prompt_length": max_prompt_length_for(args.data, max_length),
            "chat_template": "auto" if args.data == "conversational" else "none",
            "batch_size": batch_size, "steps": args.steps or max(1, pairs // batch_size),
            "warmup": not args.no_warmup, "dtype": dtype, "threads": args.threads,
            "clock": args.clock,
            "workdir": str(workdir), "python": sys.executable, **baseline}


def run_rounds(args: argparse.Namespace, spec: dict, workdir: Path) -> dict[str, list[dict]]:
    """Every variant once per round, so a change in machine load hits all alike. A run during
    which other processes used more than --max_contention of the CPUs is redone (up to
    --retries times); the least disturbed attempt counts."""
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    for round_index in range(args.repeats):
        for name in args.variants:
            variant_spec = {**spec, "python": args.trl_python} if VARIANTS[name][0] == "trl" \
                else spec
            attempts = []
            while len(attempts) <= args.retries:
                wait_until_quiet(args.max_contention, args.quiet_wait)
                attempts.append(run_variant(name, variant_spec, workdir))
                run = attempts[-1]["run"]
                print(f"  round {round_index + 1}/{args.repeats} {name}: {run['seconds']:.2f} s,"
                      f" other processes used {100 * run['contention']:.0f}% of the CPUs, "
                      f"loadavg {run['loadavg']}", flush=True)
                if run["contention"] <= args.max_contention:
                    break
            results[name].append(min(attempts, key=lambda a: a["run"]["contention"]))
    return results


def build_report(args, argv, spec: dict, visited: dict, rows: dict, peak: float) -> dict:
    shape = MODEL_PRESETS[args.preset]
    segments = visited["segments"]
    report = {
        "command": "python -m benchmarks.bench_dpo " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": machine_description(),
        "matmul_peak_flops": peak,
        "setup": {"preset": args.preset, "data": args.data, "pairs": spec["pairs"],
                  "max_length": spec["max_length"],
                  "max_prompt_length": spec["max_prompt_length"],
                  "batch_size": spec["batch_size"], "steps": spec["steps"],
                  "repeats": args.repeats, "dtype": spec["dtype"], "shape": asdict(shape),
                  "baseline": args.baseline,
                  "clock": spec["clock"], "threads": spec["threads"],
                  "matmul_params": shape.body_params + shape.head_params,
                  "total_params": shape.total_params,
                  "lora_params": shape.lora_params(LORA_R),
                  "mean_prompt_tokens": statistics.mean(s[0] for s in segments),
                  "mean_response_tokens": statistics.mean((s[1] + s[2]) / 2 for s in segments),
                  "truncated_pairs": visited["truncated_pairs"],
                  "tokens": rows[args.variants[0]]["tokens"]},
        "rows": rows,
        **compare(rows),
    }
    if "trl" in rows:
        report["token_ids_vs_trl"] = token_id_agreement(visited["token_ids"],
                                                        rows["trl"]["token_ids"])
    for row in rows.values():
        row.pop("token_ids", None)
    return report


def write_outputs(args, report: dict) -> None:
    print()
    print(format_table(report["rows"]))
    for key, value in {**report["ratios"], **report["checks"]}.items():
        print(f"{key}: {value:.4g}")
    if "token_ids_vs_trl" in report:
        print(f"token ids vs trl: {json.dumps(report['token_ids_vs_trl'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(report))
    if args.plot:
        setup = report["setup"]
        plot(report["rows"], f"{setup['preset']} / {setup['data']}, {setup['pairs']} pairs x "
                             f"{setup['max_length']} tokens, batch {setup['batch_size']}",
             args.plot)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = base_spec(args, workdir)
    visited = visiting_order(spec)
    spec["trl_row_order"] = visited["rows"]
    device = "cuda" if spec["dtype"] == "bfloat16" else "cpu"
    peak = matmul_peak_flops(spec["dtype"], device)
    results = run_rounds(args, spec, workdir)
    peak = max(peak, matmul_peak_flops(spec["dtype"], device))
    rows = {name: summarise(name, results[name], visited, spec["steps"], spec["batch_size"],
                            MODEL_PRESETS[args.preset], peak) for name in args.variants}
    report = build_report(args, argv, spec, visited, rows, peak)
    write_outputs(args, report)
    failed = [k for k, v in report["checks"].items() if "first-step loss" in k and v > 1e-4]
    return 1 if failed or any(not math.isfinite(r["tokens_per_s"]) for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
