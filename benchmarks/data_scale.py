"""Time to the first step and peak memory on full-size preference files.

UltraFeedback-shaped pairs (word counts drawn as `synthetic.py` draws UltraFeedback's lengths
at max_length 1024: medians ~80 / 250 / 200 words, heavy tails; rows in UltraFeedback's format,
the prompt repeated in both message lists; 61,135 pairs are ~280 MB of JSON Lines), a tiny
2-layer Llama with a chat template, `--max_length 1024`, `--max_steps 1`. Each run is its own
process tree, timed from its start until its first optimizer step is logged, with the resident
memory of the whole tree sampled every 0.1 s: every process's RSS summed, and every process's
PSS summed (proportional set size: a page several processes share, such as the libraries the
spawned tokenizing workers and their parent all map, counted once over the tree, not once per
process).

Variants, at each size: this trainer with an empty tokenized cache (cold) and again with the
cache it left (warm), in one process and in two (`accelerate launch`, gloo on the CPU); trl 1.16's
`DPOTrainer` (`load_dataset("json")` + its fingerprinted `map`) with an empty `datasets` cache
and again with a warm one. Cold and warm runs of one size follow each other, so they see the
same load on a shared machine.

    python -m benchmarks.data_scale --pairs 10000,30000,61135 \\
        --json benchmarks/results/data-scale.json --markdown benchmarks/results/data-scale.md \\
        --plot benchmarks/results/data-scale.png

    # Warm runs again, this trainer and trl alternating (after a full run in that workdir)
    python -m benchmarks.data_scale warm-rounds <workdir> 61135 3

    # The cache's int32 files against a datasets Arrow table, read back
    python -m benchmarks.data_scale compare-stores <cache dir>/<entry>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.synthetic import SEED, WordSource, _target_lengths

ROOT = Path(__file__).resolve().parents[1]
ULTRAFEEDBACK_PAIRS = 61_135
# Pseudo-words of at most this many letters: with the UltraFeedback word counts the rows are
# as long in bytes as UltraFeedback's (61,135 pairs ~ 280 MB).
MAX_WORD_LETTERS = 4
LEXICON = 5000
TOKENIZER_VOCAB = 8000


def _lexicon(seed: int) -> WordSource:
    source = WordSource(seed, 4 * LEXICON)
    short = [i for i, word in enumerate(source.words) if len(word) <= MAX_WORD_LETTERS]
    source.words = [source.words[i] for i in short][:LEXICON]
    source.cumulative = source.cumulative[:len(source.words)]
    return source


def write_pairs(path: Path, num_pairs: int) -> Path:
    """`num_pairs` UltraFeedback-format rows (written once; kept for later runs)."""
    if path.is_file():
        return path
    source, rng = _lexicon(SEED), random.Random(SEED)
    partial = path.with_suffix(".partial")
    with open(partial, "w") as f:
        for _ in range(num_pairs):
            prompt, chosen, rejected = (" ".join(source.sample(count)) for count in
                                        _target_lengths("ultrafeedback", 1024, rng))
            f.write(json.dumps({
                "prompt": prompt,
                "chosen": [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": chosen}],
                "rejected": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": rejected}]}) + "\n")
    os.replace(partial, path)
    return path


def build_model(workdir: Path) -> Path:
    """A 2-layer Llama (hidden 64) and a BPE tokenizer with a chat template, saved like a Hub
    checkpoint (built once)."""
    from dpo_core.testing import tiny_llama, train_tokenizer

    model_dir = workdir / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    source = _lexicon(SEED + 1)
    tokenizer = train_tokenizer((" ".join(source.sample(60)) for _ in range(20_000)),
                                vocab_size=TOKENIZER_VOCAB)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                       seed=SEED)
    partial = workdir / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, model_dir)
    return model_dir


def _tree_memory(process) -> dict[int, tuple[str, int, int]]:
    """pid -> (what it runs, resident bytes, proportional bytes) of `process` and all its
    descendants."""
    import psutil

    sizes = {}
    for member in [process, *process.children(recursive=True)]:
        try:
            memory = member.memory_full_info()
            sizes[member.pid] = (" ".join(member.cmdline())[:200], memory.rss, memory.pss)
        except psutil.Error:
            pass
    return sizes


def measure(command: list[str], first_step: Path, env: dict | None = None,
            log: Path | None = None) -> dict:
    """Run `command` from the repository root: seconds until `first_step` (a file the run
    writes after its first optimizer step) holds a train record, the CPU seconds of the
    whole run (every process of it; on a shared machine steadier than wall time), and the
    peak resident memory of the whole process tree (sum over its processes of RSS, and of
    PSS, sampled every 0.1 s) and of each training process. Raises if the command fails."""
    import psutil

    started = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                                 stdout=out, stderr=subprocess.STDOUT)
    process, peak, peak_pss, to_first_step = psutil.Process(child.pid), 0, 0, None
    peaks: dict[int, tuple[str, int]] = {}
    while True:
        # wait4: the run's CPU time, its reaped descendants' (the tokenizing workers) included.
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        sizes = _tree_memory(process)
        peak = max(peak, sum(rss for _, rss, _ in sizes.values()))
        peak_pss = max(peak_pss, sum(pss for _, _, pss in sizes.values()))
        for pid, (what, rss, _) in sizes.items():
            peaks[pid] = (what, max(rss, peaks.get(pid, (what, 0))[1]))
        if to_first_step is None and first_step.is_file() and '"train"' in first_step.read_text():
            to_first_step = time.perf_counter() - started
        time.sleep(0.1)
    returncode = os.waitstatus_to_exitcode(status)
    child.returncode = returncode  # reaped here, not by Popen
    if returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {returncode} "
                           f"(log: {log})")
    total = time.perf_counter() - started
    trainers = sorted((rss for what, rss in peaks.values()
                       if ("train.py" in what or "trl-worker" in what)
                       and "accelerate" not in what), reverse=True)
    return {"first_step_s": round(to_first_step or total, 2), "total_s": round(total, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(peak / 2**20), "peak_pss_mb": round(peak_pss / 2**20),
            "process_peaks_mb": [round(r / 2**20)
                                                                   for r in trainers],
            "loadavg": round(os.getloadavg()[0], 2)}


TRAIN_FLAGS = ["--num_samples", "0", "--eval_fraction", "0", "--max_steps", "1",
               "--batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "1024",
               "--num_sample_prompts", "0", "--save_steps", "0", "--logging_steps", "1"]


def ours(model_dir: Path, data: Path, out: Path, cache: Path, processes: int) -> list[str]:
    """This trainer's command line: one process, or `accelerate launch` of two (gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable] if processes == 1 else [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port)]
    return [*launcher, "train.py", "--model_name", str(model_dir), "--dataset_name", str(data),
            "--output_dir", str(out), "--tokenized_cache_dir", str(cache), *TRAIN_FLAGS]


def trl_worker(data: str, model_dir: str, out: str) -> None:
    """trl 1.16's DPOTrainer on the same file, model and settings (LoRA r16 on q/k/v/o,
    max_length 1024, batch 2, fp32 on the CPU): `load_dataset("json")` and its fingerprinted
    `map` cache in HF_DATASETS_CACHE. Writes a train record to out/train_log.jsonl after the
    first step."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with open(os.path.join(out, "train_log.jsonl"), "a") as f:
                f.write(json.dumps({"split": "train", "step": state.global_step}) + "\n")

    os.makedirs(out, exist_ok=True)
    # trl 1.16 extracts the prompt from the message lists only when there is no 'prompt'
    # column (a string prompt beside message lists stops its tokenizer).
    dataset = load_dataset("json", data_files=data, split="train").remove_columns("prompt")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=2, max_steps=1,
                     max_length=1024, logging_steps=1, save_strategy="no", eval_strategy="no",
                     report_to="none", bf16=False, use_cpu=True, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
               peft_config=lora, callbacks=[FirstStep()]).train()


def trl(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.data_scale", "trl-worker", str(data),
            str(model_dir), str(out)]


def command_for(system: str, model_dir: Path, data: Path, out: Path, cache: Path,
                processes: int) -> tuple[list[str], dict]:
    """(command line, environment) of one run; `cache` is the tokenized cache (ours) or the
    datasets cache (trl)."""
    if system == "ours":
        return ours(model_dir, data, out, cache, processes), {}
    return trl(model_dir, data, out), {"HF_DATASETS_CACHE": str(cache)}


# (variant, processes, cache state): every cold run is followed by its warm rerun.
VARIANTS = {"ours": [(1, "cold"), (1, "warm"), (2, "cold"), (2, "warm")],
            "trl": [(1, "cold"), (1, "warm")]}


def run_size(workdir: Path, model_dir: Path, num_pairs: int, systems: list[str],
             max_processes: int = 2) -> list[dict]:
    data = write_pairs(workdir / f"pairs-{num_pairs}.jsonl", num_pairs)
    (workdir / "runs").mkdir(exist_ok=True)
    rows = []
    for system in systems:
        for processes, cache_state in VARIANTS[system]:
            if processes > max_processes:
                continue
            name = f"{system}-{processes}p-{cache_state}-{num_pairs}"
            out, cache = workdir / "runs" / name, workdir / f"cache-{system}-{processes}p"
            shutil.rmtree(out, ignore_errors=True)
            if cache_state == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            command, env = command_for(system, model_dir, data, out, cache, processes)
            result = measure(command, out / "train_log.jsonl", env,
                             workdir / "runs" / f"{name}.log")
            rows.append({"system": system, "processes": processes, "cache": cache_state,
                         "pairs": num_pairs, "data_mb": round(data.stat().st_size / 2**20),
                         **result})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def warm_rounds(workdir: Path, num_pairs: int, rounds: int) -> list[dict]:
    """This trainer's and trl's warm one-process runs again, alternating, `rounds` times, on
    the caches a full run left in `workdir`: the warm ratio with both seeing the same load."""
    data, model_dir = workdir / f"pairs-{num_pairs}.jsonl", workdir / "model"
    rows = []
    for round_index in range(rounds):
        for system in ("ours", "trl"):
            name = f"{system}-1p-warm-{num_pairs}-round{round_index}"
            out, cache = workdir / "runs" / name, workdir / f"cache-{system}-1p"
            if not cache.is_dir():
                raise SystemExit(f"{cache}: no cache; run the full benchmark in {workdir} first")
            shutil.rmtree(out, ignore_errors=True)
            command, env = command_for(system, model_dir, data, out, cache, 1)
            rows.append({"system": system, "round": round_index, "pairs": num_pairs,
                         **measure(command, out / "train_log.jsonl", env,
                                   workdir / "runs" / f"{name}.log")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def series(rows: list[dict]) -> list[tuple[tuple, list, list, list]]:
    """Per variant (system, processes, cache): pairs, seconds and MB, by size."""
    found = []
    for key in sorted({(r["system"], r["processes"], r["cache"]) for r in rows}):
        points = sorted((r["pairs"], r["first_step_s"], r["peak_rss_mb"]) for r in rows
                        if (r["system"], r["processes"], r["cache"]) == key)
        found.append((key, *(list(column) for column in zip(*points, strict=True))))
    return found


def slopes(rows: list[dict]) -> dict[str, dict]:
    """Per variant: seconds and MB per 10k pairs (least squares over the sizes) and what
    that makes of 1M pairs."""
    import numpy as np

    fits = {}
    for key, pairs, seconds, memory in series(rows):
        if len(pairs) < 2:
            continue
        (s_slope, s_base), (m_slope, m_base) = (np.polyfit(pairs, y, 1)
                                                for y in (seconds, memory))
        fits["{}-{}p-{}".format(*key)] = {
            "s_per_10k": round(s_slope * 1e4, 1), "mb_per_10k": round(m_slope * 1e4),
            "1m_pairs_s": round(s_base + s_slope * 1e6),
            "1m_pairs_mb": round(m_base + m_slope * 1e6)}
    return fits


def markdown(rows: list[dict], fits: dict[str, dict]) -> str:
    lines = ["| pairs (JSONL MB) | system | processes | cache | first step (s) | CPU s, whole "
             "run | peak RSS, tree (MB) | peak PSS, tree (MB) | peak RSS per training process "
             "(MB) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pairs']:,} ({r['data_mb']}) | {r['system']} | {r['processes']} | "
                     f"{r['cache']} | {r['first_step_s']:.1f} | {r.get('cpu_s', '-')} | "
                     f"{r['peak_rss_mb']:,} | {r.get('peak_pss_mb', '-')} | "
                     f"{', '.join(map(str, r['process_peaks_mb']))} | "
                     f"{r['loadavg']} |")
    lines += ["", "| variant | s per 10k pairs | MB per 10k pairs | 1M pairs: first step (s) "
              "| 1M pairs: peak RSS (MB) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {f['s_per_10k']} | {f['mb_per_10k']} | {f['1m_pairs_s']:,} | "
              f"{f['1m_pairs_mb']:,} |" for name, f in fits.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (seconds, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, pairs, s, mb in series(rows):
        label = "{} {}p {}".format(*key)
        style = "--" if key[2] == "warm" else "-"
        seconds.plot(pairs, s, style, marker="o", label=label)
        memory.plot(pairs, mb, style, marker="o", label=label)
    seconds.set(xlabel="pairs", ylabel="seconds to the first step", title="Time to first step")
    memory.set(xlabel="pairs", ylabel="MB", title="Peak RSS of the process tree")
    seconds.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def compare_stores(entry: str, reads: int = 20_000) -> dict:
    """The cache entry's train split read back two ways, in one process: as this project
    maps it (`TokenStore` on memory-mapped int32 files) and as a `datasets` Arrow table
    (`save_to_disk` / `load_from_disk`, int32 list columns): seconds to open, seconds for
    `reads` random pairs, resident MB added by each, and the Arrow table's bytes per token
    (the cache's are 4)."""
    import random as rand

    import datasets
    import psutil

    from dpo_core.data.token_store import open_store

    manifest = json.loads((Path(entry) / "manifest.json").read_text())
    me = psutil.Process()
    store = open_store(Path(entry), "train", manifest["digests"]["train"])
    arrow_dir = Path(entry).parent / "arrow-copy"
    if not arrow_dir.is_dir():
        features = datasets.Features({k: datasets.Sequence(datasets.Value("int32"))
                                      for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
        rows = {k: [] for k in features}
        for pair in store:
            for key in rows:
                rows[key].append(getattr(pair, key))
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(arrow_dir))
        del rows
    generator = rand.Random(0)
    order = [generator.randrange(len(store)) for _ in range(reads)]
    num_tokens = len(store.tokens)
    del store  # unmapped: the pages it touched leave this process's RSS
    result = {}
    for name, opener in (("int32 file read per pair (TokenStore)",
                          lambda: open_store(Path(entry), "train",
                                             manifest["digests"]["train"])),
                         ("datasets Arrow", lambda: datasets.load_from_disk(str(arrow_dir)))):
        before = me.memory_info().rss
        started = time.perf_counter()
        opened = opener()
        opened_s = time.perf_counter() - started
        started = time.perf_counter()
        tokens = sum(len(opened[i]["chosen_ids"]) if isinstance(opened, datasets.Dataset)
                     else len(opened[i].chosen_ids) for i in order)
        result[name] = {"open_s": round(opened_s, 3),
                        f"{reads}_random_pairs_s": round(time.perf_counter() - started, 2),
                        "rss_added_mb": round((me.memory_info().rss - before) / 2**20),
                        "chosen_tokens": tokens}
    result["bytes_per_token"] = round(
        sum(p.stat().st_size for p in arrow_dir.glob("*.arrow"))
        / num_tokens, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trl-worker"]:
        trl_worker(*argv[1:])
        return 0
    if argv[:1] == ["compare-stores"]:
        print(json.dumps(compare_stores(argv[1]), indent=1))
        return 0
    if argv[:1] == ["warm-rounds"]:
        workdir, num_pairs, rounds = Path(argv[1]), int(argv[2]), int(argv[3])
        rows = warm_rounds(workdir, num_pairs, rounds)
        (workdir / f"warm-rounds-{num_pairs}.json").write_text(json.dumps(rows, indent=1))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=f"10000,30000,{ULTRAFEEDBACK_PAIRS}")
    parser.add_argument("--systems", default="ours,trl")
    parser.add_argument("--one_process", action="store_true",
                        help="leave out the two-process runs")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dpo-data-scale"))
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(workdir)
    rows = []
    for num_pairs in map(int, args.pairs.split(",")):
        rows += run_size(workdir, model_dir, num_pairs, args.systems.split(","),
                         max_processes=1 if args.one_process else 2)
    fits = slopes(rows)
    table = markdown(rows, fits)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "slopes": fits}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
