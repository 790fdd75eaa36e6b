"""GPU checks in one process group, one JSON file: run by benchmarks/gpu_check.sh.

1. `attention`: a packed padding-free row through FlexAttention (`BlockMask`) and through the
   per-block SDPA path, fp32 and bf16: log-probs and LoRA gradients must agree; times of both.
2. `bench`: the realistic preset on a TinyLlama-shaped random model in bf16, this trainer's
   defaults (and the padded standard path) against trl's DPOTrainer when trl is installed:
   tokens/s, peak GPU memory, MFU at the FLOP model's count, first-step losses.
3. `qlora`: a few 4-bit QLoRA steps through the trainer when bitsandbytes is installed.

Each part records its own error instead of stopping the others.

    python -m benchmarks.gpu_check --out gpu_check.json
    python -m benchmarks.gpu_check --dry-run      # CPU: builds every model, batch and command,
                                                  # stops before anything needs CUDA (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lora_model(attn_implementation: str, dtype, layers: int = 2, device: str = "cuda"):
    import torch
    from peft import LoraConfig, get_peft_model

    from dpo_core.testing import tiny_llama

    base = tiny_llama(vocab_size=32000, hidden_size=512, num_layers=layers, num_heads=8,
                      num_kv_heads=4, attn_implementation=attn_implementation)
    model = get_peft_model(base.to(device, dtype), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.02).to(param))
    return model


def check_attention(dry_run: bool = False) -> dict:
    """FlexAttention vs per-block SDPA on the same packed rows: equal log-probs and grads.
    `dry_run`: models and batches on the CPU, nothing run (FlexAttention has no CPU backward)."""
    import torch

    from benchmarks.attention_options import realistic_batches
    from dpo_core.forward.attention import use_packed_attention
    from dpo_core.forward.packing import padding_free_forward, padding_free_prefix_shared_forward

    device = "cpu" if dry_run else "cuda"
    results = {}
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in realistic_batches(32000, 1024, 8, 3)]
    for dtype_name, tolerance in (("float32", 1e-4), ("bfloat16", 5e-2)):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        flex = _lora_model("flex_attention", dtype, device=device)
        sdpa = _lora_model("sdpa", dtype, device=device)
        sdpa.load_state_dict(flex.state_dict())
        assert use_packed_attention(sdpa.get_base_model())
        if dry_run:
            results[dtype_name] = {"dry_run": True, "batches": len(batches),
                                   "rows": [int(b["chosen_input_ids"].shape[1]) for b in batches]}
            continue
        for forward in (padding_free_forward, padding_free_prefix_shared_forward):
            worst_value, worst_grad, times = 0.0, 0.0, {"flex": [], "sdpa_blocks": []}
            for batch in batches:
                outputs = {}
                for name, model in (("flex", flex), ("sdpa_blocks", sdpa)):
                    model.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    chosen, rejected = forward(model, batch)
                    (chosen.sum() - 0.5 * rejected.sum()).backward()
                    torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - started)
                    grads = {n: p.grad.float() for n, p in model.named_parameters()
                             if p.grad is not None}
                    outputs[name] = (torch.cat([chosen, rejected]).float(), grads)
                (a, grads_a), (b, grads_b) = outputs["flex"], outputs["sdpa_blocks"]
                worst_value = max(worst_value, float((a - b).abs().max() / b.abs().max()))
                worst_grad = max(worst_grad, max(
                    float((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max().clamp(
                        min=1e-12)) for n in grads_b))
            results[f"{dtype_name}/{forward.__name__}"] = {
                "max_relative_logp_diff": worst_value, "max_relative_grad_diff": worst_grad,
                "equal": worst_value <= tolerance and worst_grad <= 10 * tolerance,
                "seconds_median": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
            }
    return results


def run_bench(workdir: str, repeats: int, dry_run: bool = False) -> dict:
    """The realistic preset on the TinyLlama shape, through bench_dpo (subprocesses).
    `dry_run`: the command is only parsed by bench_dpo, not run."""
    try:
        import trl  # noqa: F401

        compare = ["--compare", "trl"]
    except ImportError:
        compare = []
    out = os.path.join(workdir, "bench.json")
    command = [sys.executable, "-m", "benchmarks.bench_dpo", "--preset", "tinyllama",
               "--data", "ultrafeedback", "--pairs", "64", "--max_length", "1024",
               "--batch_size", "8", "--variants", "standard,defaults,auto",
               "--repeats", str(repeats), "--quiet_wait", "0", "--retries", "0",
               "--workdir", workdir, "--json", out, *compare]
    if dry_run:
        from benchmarks.bench_dpo import parse_args

        parsed = parse_args(command[3:])
        return {"dry_run": True, "command": " ".join(command[1:]), "variants": parsed.variants}
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    result = {"command": " ".join(command[1:]), "returncode": completed.returncode,
              "stdout_tail": completed.stdout[-4000:], "stderr_tail": completed.stderr[-4000:]}
    if os.path.isfile(out):
        result["report"] = json.loads(Path(out).read_text())
    return result


def run_qlora(workdir: str, dry_run: bool = False) -> dict:
    """Four 4-bit QLoRA steps on a small random Llama through the trainer. `dry_run`: the
    assets and the config (validated), no training."""
    import bitsandbytes  # noqa: F401

    from benchmarks.synthetic import build_assets
    from dpo_core.config.train import TrainConfig
    from dpo_core.training.trainer import train

    assets = build_assets("cpu-medium", "ultrafeedback", 32, 512, Path(workdir))
    config = TrainConfig(model_name=assets["model_dir"], dataset_name=assets["data_path"],
                         output_dir=os.path.join(workdir, "qlora"), overwrite_output_dir=True,
                         num_samples=0, eval_fraction=0.0, max_length=512,
                         max_prompt_length=256, chat_template="none", quantization="4bit",
                         batch_size=4, gradient_accumulation_steps=1, max_steps=4,
                         logging_steps=1, eval_steps=0, save_steps=0, num_sample_prompts=0,
                         report_to="none")
    if dry_run:
        config.validate()
        return {"dry_run": True, "model_dir": Path(assets["model_dir"]).name}
    started = time.perf_counter()
    metrics = train(config)
    return {"seconds": time.perf_counter() - started, "train": metrics["train"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", default="attention,bench,qlora")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: build every part's models, batches and commands, and "
                             "stop before anything needs CUDA")
    args = parser.parse_args(argv)
    import torch

    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__}
    workdir = tempfile.mkdtemp(prefix="dpo-gpu-check-")
    dry = args.dry_run
    parts = {"attention": lambda: check_attention(dry),
             "bench": lambda: run_bench(workdir, args.repeats, dry),
             "qlora": lambda: run_qlora(workdir, dry)}
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            report[name] = parts[name]()
        except Exception as error:  # every part reports; one failure does not hide the others
            report[name] = {"error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-3000:]}
        report[name + "_seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
