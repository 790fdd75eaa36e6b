"""Resumable checkpoints: adapter, optimizer, position in the data order and RNG states.

A checkpoint is written into a hidden temporary directory and renamed into place, and an old
one is renamed to a hidden name before it is deleted, so a run killed mid-save or mid-rotation
never leaves a half-written `checkpoint-N` that `latest` could pick. Everything is read back
safely: safetensors for weights, `torch.load(weights_only=True)` for the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Hidden (leading dot) names: work in progress or being deleted, never a checkpoint.
PARTIAL_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")
ADAPTER_DIR, OPTIMIZER_FILE, STATE_FILE = "adapter", "optimizer.pt", "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and says why."""


@dataclass
class TrainState:
    """Where a run is: enough, with the config, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps completed
    micro_batches_seen: int = 0  # position in the (epoch-by-epoch shuffled) micro-batch stream
    nonfinite_steps_skipped: int = 0
    # The settings that fix which pairs make up each step (`data_order` below): a
    # resume under other values would silently replay other pairs.
    data_order: dict = field(default_factory=dict)


def data_order(config, num_processes: int, train_pairs: int) -> dict:
    """What decides which pairs make up step N (`config`: the TrainConfig); a checkpoint
    records it, and resuming under anything else is refused."""
    return {"--batch_size": config.batch_size,
            "--gradient_accumulation_steps": config.gradient_accumulation_steps,
            "--seed": config.seed, "--group_by_length": config.group_by_length,
            "processes": num_processes, "training pairs": train_pairs}


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
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
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
    """Write `checkpoint-<step>` atomically; keep only the newest `total_limit` (0 = all)."""
    final = os.path.join(output_dir, f"checkpoint-{state.step}")
    tmp = os.path.join(output_dir, f".checkpoint-{state.step}.tmp")
    if accelerator.is_main_process:
        _remove_partial(output_dir)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    # Each process has its own RNG streams; the optimizer state is replicated under DDP.
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    save_adapter(accelerator, model, os.path.join(tmp, ADAPTER_DIR))
    accelerator.wait_for_everyone()  # every process's files are in before the rename
    if accelerator.is_main_process:
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(asdict(state), f, indent=2)
        if os.path.isdir(final):  # the same step saved again after resuming from earlier
            _discard(final)
        os.rename(tmp, final)
        if total_limit > 0:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def save_adapter(accelerator: Accelerator, model: torch.nn.Module, directory: str) -> None:
    """Write the adapter (safetensors) from the main process. Call it on every process: under
    FSDP and ZeRO-3 each holds a shard of the weights, and gathering them is collective."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict)


def _discard(checkpoint: str) -> None:
    """Rename first (atomic), then delete: a kill mid-delete leaves only a hidden directory."""
    parent, name = os.path.split(checkpoint)
    hidden = os.path.join(parent, f".{name}.old")
    os.rename(checkpoint, hidden)
    shutil.rmtree(hidden)


def _remove_partial(output_dir: str) -> None:
    """Delete what killed runs left half-written or half-deleted."""
    for name in os.listdir(output_dir):
        if PARTIAL_RE.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def load_checkpoint(
    path: str,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_order: dict,
) -> TrainState:
    """Restore adapter weights, optimizer, RNG streams; return where the run stood.
    Refuse, before changing anything, a checkpoint saved under another `data_order`."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = TrainState(**json.load(f))
    changed = [f"{key} {state.data_order[key]!r} (now {value!r})"
               for key, value in data_order.items()
               if key in state.data_order and state.data_order[key] != value]
    if changed:
        raise CheckpointError(
            f"checkpoint {path!r} was saved with {', '.join(changed)}; resuming with other "
            "values would not replay the same pairs. Resume with the checkpoint's settings.")
    state.data_order = data_order
    weights = load_file(os.path.join(path, ADAPTER_DIR, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} has weights this model lacks: {unexpected[:3]}")
    # Read onto the CPU (a process's device name, e.g. 'cpu:1' under gloo, may not be one
    # torch.load can map to); load_state_dict moves each state to its parameter's device.
    optimizer.load_state_dict(_load_plain(os.path.join(path, OPTIMIZER_FILE)))
    rng_file = os.path.join(path, f"rng_state_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(_load_plain(rng_file))
    return state


def _load_plain(path: str):
    """`torch.load` restricted to tensors and plain containers: a tampered file cannot run code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path!r} holds more than tensors and plain data; refusing to load it "
            f"({str(error).splitlines()[0]})") from None
