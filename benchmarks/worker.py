"""One benchmark variant in its own process: `python -m benchmarks.worker SPEC.json`.

Trains with this project's trainer (`dpo_core.training.trainer.train` with a `TrainConfig`) or trl's
`DPOTrainer`, a one-step warm-up run first (not measured) unless the spec says otherwise, and
writes the measured run's time, losses, peak memory and the share of the CPUs other processes
used meanwhile to the spec's `result_path`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.synthetic import BETA, LEARNING_RATE, LORA_ALPHA, LORA_R, SEED

# Wall time for the contention meter, even after `use_cpu_clock` repoints time.perf_counter.
_wall_clock = time.perf_counter


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process training run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def _trainer_api():
    """(TrainConfig, resolve_gradient_checkpointing, train) of whichever dpo_core is imported:
    this layout, or a baseline revision from before dpo_core was split into packages."""
    try:
        from dpo_core.config.train import TrainConfig
        from dpo_core.modeling.loading import resolve_gradient_checkpointing
        from dpo_core.training.trainer import train
    except ModuleNotFoundError:  # a flat dpo_core (revisions before the package layout)
        from dpo_core.model import resolve_gradient_checkpointing
        from dpo_core.trainer import train

        from dpo_core.config import TrainConfig
    return TrainConfig, resolve_gradient_checkpointing, train


def _run_ours(spec: dict, output_dir: str, steps: int) -> dict:
    import dataclasses

    TrainConfig, resolve_gradient_checkpointing, train = _trainer_api()

    settings = dict(
        model_name=spec["model_dir"], dataset_name=spec["data_path"], output_dir=output_dir,
        overwrite_output_dir=True, num_samples=0, eval_fraction=0.0, seed=SEED,
        max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
        chat_template=spec["chat_template"], quantization="none", dtype=spec["dtype"],
        lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_target_modules="all-linear",
        batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LEARNING_RATE, warmup_steps=0, beta=BETA, logging_steps=1,
        eval_steps=0, save_steps=0, num_sample_prompts=0, report_to="none", **spec["settings"])
    # A baseline revision may predate some flags: it runs without them, and the result says
    # which were left out.
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{key: value for key, value in settings.items() if key in known})
    metrics = train(config)
    with open(os.path.join(output_dir, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps_log = [record for record in log if record["split"] == "train"]
    return {
        "seconds": metrics["train_runtime_s"] + metrics["reference_pass_s"],
        "reference_pass_s": metrics["reference_pass_s"],
        "losses": [record["loss"] for record in steps_log],
        "first_step": {key: steps_log[0][key] for key in ("loss", "logps/chosen",
                                                          "logps/rejected")},
        "code": _code_origin(spec),
        "settings_left_out": sorted(set(settings) - known),
        "config": {"prefix_sharing": config.prefix_sharing,
                   "padding_free": getattr(config, "padding_free", False),
                   "precompute_ref_log_probs": config.precompute_ref_log_probs,
                   "gradient_checkpointing": resolve_gradient_checkpointing(
                       config.gradient_checkpointing),
                   "group_by_length": config.group_by_length},
    }


def _code_origin(spec: dict) -> str:
    """Which dpo_core ran, without machine paths: the exported baseline tree's directory name,
    or "this checkout"."""
    import dpo_core

    tree = Path(dpo_core.__file__).resolve().parents[1]
    if spec.get("checkout") and tree == Path(spec["checkout"]).resolve():
        return tree.name
    return "this checkout" if tree == Path(__file__).resolve().parents[1] else str(tree)


def _run_trl(spec: dict, output_dir: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    with open(spec["data_path"]) as f:
        rows = [json.loads(line) for line in f]
    # Our trainer's first-epoch order, so step k trains on the same pairs in both.
    dataset = Dataset.from_list([rows[i] for i in spec["trl_row_order"]])
    dtype = getattr(torch, spec["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                 attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", beta=BETA, loss_type=["sigmoid"], max_length=spec["max_length"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        gradient_checkpointing=spec["settings"]["gradient_checkpointing"],
        bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential", seed=SEED, disable_tqdm=True,
        dataloader_num_workers=0)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora)
    # trl's own tokenization of each row (before its collator truncates), in training order.
    token_ids = [[row[f"{part}_ids"] for part in ("prompt", "chosen", "rejected")]
                 for row in trainer.train_dataset]
    result = trainer.train()
    steps_log = [record for record in trainer.state.log_history if "loss" in record]
    return {
        "seconds": result.metrics["train_runtime"],
        "reference_pass_s": 0.0,
        "losses": [record["loss"] for record in steps_log],
        "first_step": {key: steps_log[0][key] for key in ("loss", "logps/chosen",
                                                          "logps/rejected")},
        "config": dict(spec["settings"]),
        "token_ids": token_ids,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec;
    ru_maxrss would carry over the parent's peak into a subprocess."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class ContentionMeter:
    """Share of the machine's CPU time that OTHER processes used while it ran: on a shared
    machine a busy neighbour can slow a multi-threaded run several times over, and this says
    when it happened. (busy time of all CPUs - this process's CPU time) / (wall x CPUs);
    steal time (other virtual machines) counts as busy. Also this process's own kernel time
    and minor page faults meanwhile (memory the allocator handed back and faulted in again)."""

    def __enter__(self) -> ContentionMeter:
        import psutil

        self.process = psutil.Process()
        self.start = self._readings()
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own, self.system_s, self.page_faults = (
            now - then for now, then in zip(self._readings(), self.start, strict=True))
        self.others = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))

    def _readings(self) -> tuple[float, float, float, float, int]:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return _wall_clock(), self._busy(), self._own(), usage.ru_stime, usage.ru_minflt

    @staticmethod
    def _busy() -> float:
        import psutil

        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(
            times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)

    def _own(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


def use_cpu_clock() -> None:
    """Make both trainers' own timers (time.perf_counter in this project, time.time in
    transformers' Trainer) read this process's CPU time, user + system over all threads. With
    one torch thread that equals wall time on an idle machine, and a busy neighbour on a
    shared machine disturbs it far less than wall time (it still shares caches and memory
    bandwidth). Only in a benchmark worker process, which does nothing else."""
    process_time = time.process_time
    offset = time.time() - process_time()
    time.perf_counter = process_time
    time.time = lambda: offset + process_time()


def worker(spec_path: str) -> None:
    """Run one variant: a one-step warm-up run, then one measured run; write the results."""
    import psutil
    import torch

    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("checkout"):  # the baseline variant: dpo_core from another revision
        sys.path.insert(0, spec["checkout"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    run = _run_trl if spec["trainer"] == "trl" else _run_ours
    if spec.get("clock") == "cpu":
        use_cpu_clock()
    if spec["trainer"] == "trl":
        import trl  # noqa: F401  (imported before the baseline, like our modules)

    baseline_rss = psutil.Process().memory_info().rss
    cuda = torch.cuda.is_available()
    scratch = Path(spec["workdir"]) / "runs" / spec["variant"]
    for steps in ([1] if spec["warmup"] else []) + [spec["steps"]]:
        output_dir = scratch / f"run-{steps}"
        shutil.rmtree(output_dir, ignore_errors=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with ContentionMeter() as contention:
            result = run(spec, str(output_dir), steps)
        _reset_accelerate()
        shutil.rmtree(output_dir, ignore_errors=True)
    result["contention"] = contention.others
    result["system_cpu_s"], result["page_faults"] = contention.system_s, contention.page_faults
    result["loadavg"] = os.getloadavg()[0]  # 1-minute load average when the run ended
    with open(spec["result_path"], "w") as f:
        json.dump({"run": result, "peak_rss_mb": peak_rss_mb(),
                   "baseline_rss_mb": baseline_rss / 2**20,
                   "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None},
                  f)


if __name__ == "__main__":
    worker(sys.argv[1])
