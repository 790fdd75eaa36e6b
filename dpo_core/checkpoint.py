"""Resumable checkpoints: adapter, optimizer, position in the data order and RNG states.

A checkpoint is written into a hidden temporary directory and renamed into place, so a
run killed mid-save never leaves a half-written `checkpoint-N` that `latest` could pick.
Everything is read back safely: safetensors for weights, `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_DIR, OPTIMIZER_FILE, STATE_FILE = "adapter", "optimizer.pt", "trainer_state.json"


@dataclass
class TrainState:
    """Where a run is: enough, with the config, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps completed
    micro_batches_seen: int = 0  # position in the (epoch-by-epoch shuffled) micro-batch stream
    nonfinite_steps_skipped: int = 0


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(),
                  *np.random.get_state()[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, keys, *rest = state["numpy"]
    python_version, python_state, gauss = state["python"]
    random.setstate((python_version, tuple(python_state), gauss))
    np.random.set_state((version, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(path: str, output_dir: str) -> str:
    """`latest` -> the newest complete checkpoint in `output_dir`; a path must be a checkpoint."""
    if path == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir!r}")
        return found[-1]
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(
            f"--resume_from_checkpoint: {path!r} is not a checkpoint directory")
    return path


def save_checkpoint(
    output_dir: str,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    total_limit: int,
) -> str:
    """Write `checkpoint-<step>` atomically and drop the oldest beyond `total_limit` (0 = keep all)."""
    final = os.path.join(output_dir, f"checkpoint-{state.step}")
    tmp = os.path.join(output_dir, f".checkpoint-{state.step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    # Each process has its own RNG streams; the optimizer state is replicated under DDP.
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(os.path.join(tmp, ADAPTER_DIR))
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(asdict(state), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if total_limit > 0:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: str,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> TrainState:
    """Restore adapter weights, optimizer, RNG streams; return where the run stood."""
    weights = load_file(os.path.join(path, ADAPTER_DIR, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {path!r} has weights this model lacks: {unexpected[:3]}")
    optimizer.load_state_dict(
        torch.load(os.path.join(path, OPTIMIZER_FILE), weights_only=True,
                   map_location=accelerator.device)
    )
    rng_file = os.path.join(path, f"rng_state_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    with open(os.path.join(path, STATE_FILE)) as f:
        return TrainState(**json.load(f))
