"""Peak memory per process under each engine: one process, then DDP, FSDP2, ZeRO-2 and ZeRO-3
with 2 processes over gloo, on this machine's CPU (the shipped examples/accelerate configs).

Every run trains the same LoRA steps on the same synthetic model and pairs (global batch 4), and
reports each process's peak resident memory, the share of the weights the engine says the
process holds (its start-up backend line), the wall time and the last step's loss (all engines
must agree on it). On a CPU the resident memory includes the libraries (about 0.5 GB a
process), so compare the differences between engines.

    python -m benchmarks.engines --preset cpu-medium --steps 4 --markdown engines.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.synthetic import MODEL_PRESETS, build_assets

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "accelerate"
BIN = Path(sys.executable).parent
# (name, Accelerate config; None: one process without a launcher)
ENGINES = [("one process", None), ("DDP", "ddp.yaml"), ("FSDP2", "fsdp.yaml"),
           ("ZeRO-2", "deepspeed_zero2.yaml"), ("ZeRO-3", "deepspeed_zero3.yaml")]

# train.py, then this process's peak resident memory into $PEAK_DIR/rank<RANK>.json.
MEASURED_TRAIN = """
import json, os, sys
sys.path.insert(0, {root!r})
from benchmarks.worker import peak_rss_mb
from dpo_core.cli import train_main
code = train_main(sys.argv[1:])
with open(os.path.join(os.environ["PEAK_DIR"], f"rank{{os.environ.get('RANK', '0')}}.json"),
          "w") as f:
    json.dump({{"peak_rss_mb": peak_rss_mb()}}, f)
sys.exit(code)
"""


def run_engine(name: str, config_file: str | None, train_args: list[str], workdir: Path,
               port: int) -> dict:
    """One engine's run: its launcher, peak memory per process, backend line, metrics."""
    run_dir = workdir / name.replace(" ", "-")
    peak_dir = run_dir / "peaks"
    peak_dir.mkdir(parents=True)
    script = run_dir / "measured_train.py"
    script.write_text(MEASURED_TRAIN.format(root=str(ROOT)))
    out = run_dir / "out"
    batch = ["--batch_size", "4"] if config_file is None else ["--batch_size", "2"]
    launcher = ([sys.executable] if config_file is None else
                [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / config_file),
                 "--num_processes", "2", "--main_process_port", str(port)])
    env = {**os.environ, "PEAK_DIR": str(peak_dir), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home")}
    done = subprocess.run([*launcher, str(script), *train_args, *batch, "--output_dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    peaks = [json.loads(path.read_text())["peak_rss_mb"]
             for path in sorted(peak_dir.glob("rank*.json"))]
    metrics = json.loads((out / "metrics.json").read_text())
    held = re.search(r"this process holds (\d+)% of the weights", done.stdout)
    return {"engine": name, "processes": len(peaks), "peak_rss_mb": peaks,
            "weights_held": f"{held.group(1)}%" if held else "100%",
            "train_runtime_s": metrics["train_runtime_s"], "loss": metrics["train"]["loss"]}


def markdown(rows: list[dict], preset: str, steps: int, load: str) -> str:
    lines = [f"Model `{preset}` ({MODEL_PRESETS[preset].total_params / 1e6:.1f}M parameters, "
             f"fp32), LoRA, {steps} steps of 4 pairs; load average before: {load}.", "",
             "| engine | processes | peak RSS per process (MB) | weights held per process | "
             "training s | last loss |", "|---|---|---|---|---|---|"]
    for row in rows:
        peaks = ", ".join(f"{peak:.0f}" for peak in row["peak_rss_mb"])
        lines.append(f"| {row['engine']} | {row['processes']} | {peaks} | {row['weights_held']} "
                     f"| {row['train_runtime_s']:.1f} | {row['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-medium", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--markdown", help="write the table here too")
    args = parser.parse_args(argv)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        assets = build_assets(args.preset, "short", 4 * args.steps, args.max_length, workdir)
        train_args = ["--model_name", assets["model_dir"], "--dataset_name",
                      assets["data_path"], "--eval_fraction", "0", "--max_steps",
                      str(args.steps), "--gradient_accumulation_steps", "1",
                      "--max_length", str(args.max_length), "--max_prompt_length",
                      str(args.max_length // 2), "--num_sample_prompts", "0", "--save_steps",
                      "0", "--no-gradient_checkpointing", "--no-padding_free",
                      "--precompute_ref_log_probs", "--logging_steps", "1"]
        rows = [run_engine(name, config, train_args, workdir, args.port)
                for name, config in ENGINES]
    report = markdown(rows, args.preset, args.steps, load)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
