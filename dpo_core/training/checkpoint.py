"""Resumable checkpoints: trained weights (the LoRA adapter, or the whole model under full
fine-tuning), optimizer, position in the data order and RNG states, and a moving reference's
weights (`reference.safetensors`, --sync_ref_model).

A checkpoint is written into a hidden temporary directory and renamed into place, and an old
one is renamed to a hidden name before it is deleted, so a run killed mid-save or mid-rotation
never leaves a half-written `checkpoint-N` that `latest` could pick. Everything is read back
safely: safetensors for weights, `torch.load(weights_only=True)` for the rest.

Under FSDP2 no process holds the whole optimizer state: each process writes its own shards of
the trainable weights and their AdamW state with `torch.distributed.checkpoint` (`sharded/`,
one file per process plus `.metadata`) and reads them back the same way. The gathered adapter
is saved beside them, so any checkpoint's `adapter/` loads into `chat.py`. Under DeepSpeed
the engine writes its own state the same way (`deepspeed/`: its partitions of the trainable
weights and optimizer state, one file per process; the frozen weights left out) and reads it
back with `engine.load_checkpoint`. DeepSpeed reads those files with pickle: resume only from
checkpoints you trust, as with any DeepSpeed checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dpo_core.errors import CheckpointError, CheckpointSaveError, first_line
from dpo_core.modeling.adapters import POLICY_ADAPTER
from dpo_core.modeling.backends import is_deepspeed_engine, is_fsdp2_model
from dpo_core.modeling.reference import ReferenceSync
from dpo_core.run_files import PARTIAL_RE, checkpoint_dirs

ADAPTER_DIR, MODEL_DIR = "adapter", "model"  # what a checkpoint's weights are, by name

OPTIMIZER_FILE, STATE_FILE = "optimizer.pt", "trainer_state.json"
REFERENCE_FILE = "reference.safetensors"  # the moving reference's weights (--sync_ref_model)

SHARDED_DIR = "sharded"  # FSDP2: trainable weights and optimizer state, one file per process
# DeepSpeed: the engine's checkpoint (its partitions, one file per process), under one tag.
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


@dataclass
class TrainState:
    """Where a run is: enough, with the config, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps completed
    micro_batches_seen: int = 0  # position in the (epoch-by-epoch shuffled) micro-batch stream
    nonfinite_steps_skipped: int = 0
    # The settings that fix which pairs make up each step (`data_order` below): a
    # resume under other values would silently replay other pairs.
    data_order: dict = field(default_factory=dict)
    # What the run trains from (`started_from` below): its reference belongs to that start.
    started_from: dict = field(default_factory=dict)
    # --streaming: this process's place in its stream ([epoch, rows taken]); each process
    # saves and restores its own (`streaming.StreamingBatches`).
    stream_position: list | None = None


def started_from(config) -> dict:
    """The model and starting adapter a run trains from, and how its reference moves, which
    fix its reference (`config`: the TrainConfig); a checkpoint records them, and resuming
    under others is refused."""
    start = {"--model_name": config.model_name, "--adapter_path": config.adapter_path,
             "--sync_ref_model": config.sync_ref_model}
    if config.sync_ref_model:
        start.update({"--ref_model_mixup_alpha": config.ref_model_mixup_alpha,
                      "--ref_model_sync_steps": config.ref_model_sync_steps})
    return start


def data_order(config, num_processes: int, train_pairs: int | None) -> dict:
    """What decides which pairs make up step N (`config`: the TrainConfig; `train_pairs`:
    None when streamed); a checkpoint records it, and resuming under anything else is
    refused."""
    order = {"--batch_size": config.batch_size,
             "--gradient_accumulation_steps": config.gradient_accumulation_steps,
             "--seed": config.seed, "--group_by_length": config.group_by_length,
             "processes": num_processes, "training pairs": train_pairs,
             "--streaming": config.streaming}
    if config.streaming:
        order["--shuffle_buffer_size"] = config.shuffle_buffer_size
    return order


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


def resolve_checkpoint(path: str, output_dir: str) -> str:
    """`latest` -> the newest complete checkpoint in `output_dir`; a path must be a checkpoint."""
    if path == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir!r} (a run saves "
                "one every --save_steps steps); start without --resume_from_checkpoint")
        return found[-1]
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(
            f"--resume_from_checkpoint: {path!r} is not a checkpoint directory (no "
            f"{STATE_FILE}); pass a checkpoint-<step> directory or 'latest'")
    return path


def save_checkpoint(
    output_dir: str,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    total_limit: int,
    reference: ReferenceSync | None = None,
) -> str:
    """Write `checkpoint-<step>` atomically, with the moving `reference` (--sync_ref_model)
    if there is one; keep only the newest `total_limit` (0 = all)."""
    final = os.path.join(output_dir, f"checkpoint-{state.step}")
    tmp = os.path.join(output_dir, f".checkpoint-{state.step}.tmp")
    try:
        if accelerator.is_main_process:
            _remove_partial(output_dir)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        # Each process has its own RNG streams (and stream position); the optimizer state is
        # replicated under DDP.
        torch.save({**_rng_state(), "stream_position": state.stream_position},
                   _rng_file(tmp, accelerator.process_index))
        save_trained_weights(accelerator, model,
                             os.path.join(tmp, _weights_dir(accelerator.unwrap_model(model))))
        per_process = is_fsdp2_model(model) or is_deepspeed_engine(model)
        if is_fsdp2_model(model):
            save_sharded_state(model, optimizer, os.path.join(tmp, SHARDED_DIR))
        elif is_deepspeed_engine(model):
            model.save_checkpoint(os.path.join(tmp, DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                  save_latest=False, exclude_frozen_parameters=True)
        accelerator.wait_for_everyone()  # every process's files are in before the rename
        if accelerator.is_main_process:
            if not per_process:
                torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
            if reference is not None:
                save_file(reference.state_dict(), os.path.join(tmp, REFERENCE_FILE))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f, indent=2)
    except (OSError, RuntimeError, SafetensorError) as error:
        # torch.save reports a full disk as a RuntimeError, safetensors as its own error.
        shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint_dirs(output_dir)
        raise CheckpointSaveError(
            f"could not write checkpoint {final!r}: {_save_problem(error)}. Nothing partial "
            f"was left behind; the last complete checkpoint is "
            f"{kept[-1] if kept else 'none'}. Free some space (or pick another --output_dir) "
            "and continue with --resume_from_checkpoint latest.") from None
    except BaseException:  # Ctrl-C mid-save: no half-written directory either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if os.path.isdir(final):  # the same step saved again after resuming from earlier
            _discard(final)
        os.rename(tmp, final)
        if total_limit > 0:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def _save_problem(error: Exception) -> str:
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or \
            "os error 28" in text:
        return "no space left on the device"
    return first_line(error)


def save_trained_weights(accelerator: Accelerator, model: torch.nn.Module,
                         directory: str) -> None:
    """Write what trains, as safetensors, from the main process: the policy adapter alone (a
    plain PEFT adapter on the base; a frozen reference adapter is not saved), or the whole
    model (`save_pretrained`, loadable by AutoModelForCausalLM). Call it on every process:
    under FSDP and ZeRO-3 each holds a shard of the weights, and gathering them is collective."""
    if is_fsdp2_model(model):
        state_dict = gathered_trainable_state(model)
    elif is_deepspeed_engine(model):
        state_dict = deepspeed_trainable_state(model, keep=accelerator.is_main_process)
    else:
        state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    if _is_peft(unwrapped):
        unwrapped.save_pretrained(directory, state_dict=state_dict,
                                  selected_adapters=[POLICY_ADAPTER])
    else:
        unwrapped.save_pretrained(directory, state_dict=state_dict)


def _is_peft(model: torch.nn.Module) -> bool:
    # Without peft imported (full fine-tuning need not import it) no model is a PeftModel.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _weights_dir(model: torch.nn.Module) -> str:
    return ADAPTER_DIR if _is_peft(model) else MODEL_DIR


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
    start: dict,
    reference: ReferenceSync | None = None,
) -> TrainState:
    """Restore trained weights (adapter or whole model), optimizer, the moving `reference`
    (--sync_ref_model), RNG streams; return where the run stood.

    Every file is read and checked before anything is changed: a checkpoint saved under
    another `data_order`, from another `start` (`started_from`), with another adapter shape or
    the other --finetuning_type, or a damaged file, raises CheckpointError naming the
    checkpoint and what to do.
    """
    state = _read_state(path)
    if changed := _changed(state.data_order, data_order):
        raise CheckpointError(
            f"checkpoint {path!r} was saved with {changed}; resuming with other values would "
            "not replay the same pairs. Resume with the checkpoint's settings.")
    if changed := _changed(state.started_from, start):
        raise CheckpointError(
            f"checkpoint {path!r} was trained from {changed}; its weights and its reference "
            "belong to that start. Resume with the checkpoint's values of these flags, or start "
            "a new run in another --output_dir.")
    state.data_order, state.started_from = data_order, start
    unwrapped = accelerator.unwrap_model(model)
    weights_dir = _weights_dir(unwrapped)
    if not os.path.isdir(os.path.join(path, weights_dir)):
        kind = {ADAPTER_DIR: "LoRA adapter (--finetuning_type lora)",
                MODEL_DIR: "whole model (--finetuning_type full)"}[weights_dir]
        raise CheckpointError(f"checkpoint {path!r} holds no {kind}; resume with the "
                              "--finetuning_type it was saved with")
    if weights_dir == ADAPTER_DIR:
        _check_adapter_shape(path, unwrapped)
    rng_file = _rng_file(path, accelerator.process_index)
    rng_state = _load_plain(rng_file, path) if os.path.isfile(rng_file) else None
    if reference is not None:
        if not os.path.isfile(os.path.join(path, REFERENCE_FILE)):
            raise CheckpointError(
                f"checkpoint {path!r} holds no moving reference ({REFERENCE_FILE}): it was "
                "saved without --sync_ref_model. Resume it without --sync_ref_model.")
        reference_weights = _read_weights(path, [REFERENCE_FILE])
    if is_fsdp2_model(model):
        load_sharded_state(path, model, optimizer)
    elif is_deepspeed_engine(model):
        load_deepspeed_state(path, model)
    else:
        _check_not_sharded(path)
        if weights_dir == ADAPTER_DIR:
            weights = _read_weights(path, [os.path.join(ADAPTER_DIR,
                                                        "adapter_model.safetensors")])
        else:
            weights = _read_weights(path, _model_files(path))
        # Read onto the CPU (a process's device name, e.g. 'cpu:1' under gloo, may not be one
        # torch.load can map to); load_state_dict moves each state to its parameter's device.
        optimizer_state = _load_plain(os.path.join(path, OPTIMIZER_FILE), path)
        if weights_dir == ADAPTER_DIR:
            _load_adapter_weights(unwrapped, weights, path)
        else:
            _load_whole_model(unwrapped, weights, path)
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError) as error:
            raise _damaged(path, os.path.join(path, OPTIMIZER_FILE), error) from None
    if reference is not None:
        reference.load_state_dict(reference_weights, path)
    if rng_state is not None:
        try:
            _set_rng_state(rng_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise _damaged(path, rng_file, error) from None
        state.stream_position = rng_state.get("stream_position")  # this process's own
    return state


def _rng_file(checkpoint: str, process_index: int) -> str:
    """This process's RNG streams in a checkpoint (each process has its own)."""
    return os.path.join(checkpoint, f"rng_state_{process_index}.pt")


def _read_weights(checkpoint: str, files: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors `files` (relative to `checkpoint`), merged."""
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            weights.update(load_file(os.path.join(checkpoint, name)))
        except (OSError, SafetensorError) as error:
            raise _damaged(checkpoint, os.path.join(checkpoint, name), error) from None
    return weights


def _model_files(checkpoint: str) -> list[str]:
    """The safetensors files `save_pretrained` wrote: one, or the shards its index names."""
    index = os.path.join(checkpoint, MODEL_DIR, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return [os.path.join(MODEL_DIR, "model.safetensors")]
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as error:
        raise _damaged(checkpoint, index, error) from None
    return [os.path.join(MODEL_DIR, shard) for shard in shards]


def _load_adapter_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                          checkpoint: str) -> None:
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=POLICY_ADAPTER)
    except RuntimeError as error:  # shapes that _check_adapter_shape could not foresee
        raise CheckpointError(
            f"checkpoint {checkpoint!r} holds adapter weights of other shapes than this "
            f"model's ({str(error).strip().splitlines()[-1].strip()}); resume with the "
            "settings in its run's training_config.json") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} has weights this model lacks: {unexpected[:3]}")


def _load_whole_model(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                      checkpoint: str) -> None:
    """Every weight of `model` must be in `weights`, except copies of a tied weight, which
    `save_pretrained` writes once."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # other shapes: another model
        raise CheckpointError(
            f"checkpoint {checkpoint!r} holds a model of other shapes than this run's "
            f"({str(error).strip().splitlines()[-1].strip()}); resume with the settings in "
            "its run's training_config.json") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in weights if name in params}
    missing = [name for name in result.missing_keys
               if name not in params or id(params[name]) not in loaded]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} does not match this model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}")


# Only what trains is saved: the frozen base weights come from the base model again.
_TRAINABLE_ONLY = {"ignore_frozen_params": True}


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> the AdamW


def gathered_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of an FSDP2 model, whole, on the CPU of the main process (an
    empty dict elsewhere). Collective: every process must call it. The frozen base weights
    are left out, so saving an adapter never gathers the whole model onto one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, **_TRAINABLE_ONLY)
    return get_model_state_dict(model, options=options)


def save_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       directory: str) -> None:
    """Each process writes its shards of the trainable weights and of their optimizer state
    into `directory` (torch.distributed.checkpoint). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optimizer_state = get_state_dict(model, _inner_optimizer(optimizer),
                                              options=StateDictOptions(**_TRAINABLE_ONLY))
    dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded_state(path: str, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """Read the shards `save_sharded_state` wrote into checkpoint `path` back into `model`
    and `optimizer`, each process its own. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    directory = os.path.join(path, SHARDED_DIR)
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise CheckpointError(
            f"checkpoint {path!r} has no sharded state ({SHARDED_DIR}/): it was saved by a run "
            "without FSDP2. Resume it with the backend and number of processes it was saved "
            "under.")
    inner = _inner_optimizer(optimizer)
    # Templates with this process's shards; dcp.load fills them in place.
    weights, optimizer_state = get_state_dict(model, inner,
                                              options=StateDictOptions(**_TRAINABLE_ONLY))
    state = {"model": weights, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=directory)
    except Exception as error:  # dcp wraps each process's failure in its own exception type
        raise _damaged(path, directory, error) from None
    # Not strict: the frozen base weights are not in the checkpoint, by design. Every
    # trainable weight was in the template, so dcp.load has already failed if one is missing.
    set_state_dict(model, inner, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False, **_TRAINABLE_ONLY))


def deepspeed_trainable_state(engine: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The trainable weights of a DeepSpeed engine's model, whole, on the CPU where `keep`
    (an empty dict elsewhere). Collective: every process must call it. Under ZeRO-3 each weight
    is gathered from every process in turn, so no process ever holds the whole model; the
    frozen base weights are left out, as under FSDP2."""
    import deepspeed

    state = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            # A no-op for a weight ZeRO-2 keeps whole.
            with deepspeed.zero.GatheredParameters([param]):
                if keep:
                    state[name] = param.detach().to("cpu", copy=True)
    return state


def load_deepspeed_state(path: str, engine: torch.nn.Module) -> None:
    """Read the engine state `save_checkpoint` wrote into checkpoint `path` back into the
    DeepSpeed `engine`: trainable weights and optimizer state, each process its partitions.
    Collective."""
    directory = os.path.join(path, DEEPSPEED_DIR)
    if not os.path.isdir(os.path.join(directory, DEEPSPEED_TAG)):
        raise CheckpointError(
            f"checkpoint {path!r} has no DeepSpeed engine state ({DEEPSPEED_DIR}/): it was "
            "saved by a run without DeepSpeed. Resume it with the backend and number of "
            "processes it was saved under.")
    try:
        # Not strict: the frozen base weights are not in the checkpoint, by design.
        loaded, _ = engine.load_checkpoint(directory, tag=DEEPSPEED_TAG,
                                           load_module_strict=False,
                                           load_lr_scheduler_states=False)
    except Exception as error:  # DeepSpeed raises assorted types for files it cannot use
        loaded, problem = None, first_line(error)
    else:
        problem = "DeepSpeed found no state to load"
    if loaded is None:
        raise CheckpointError(
            f"checkpoint {path!r}: DeepSpeed could not load its engine state ({problem}). "
            "Resume it under the DeepSpeed config (ZeRO stage) and number of processes it "
            "was saved under, or from an earlier checkpoint.")


def _check_not_sharded(path: str) -> None:
    """A run without FSDP2 or DeepSpeed cannot resume their checkpoints (no optimizer.pt)."""
    if os.path.isfile(os.path.join(path, OPTIMIZER_FILE)):
        return
    for directory, backend in ((SHARDED_DIR, "FSDP2"), (DEEPSPEED_DIR, "DeepSpeed")):
        if os.path.isdir(os.path.join(path, directory)):
            raise CheckpointError(
                f"checkpoint {path!r} holds per-process state saved under {backend}; resume "
                f"it under {backend} with the same number of processes (its adapter/ can "
                "still be used as an adapter)")


def _damaged(checkpoint: str, file: str, error: Exception) -> CheckpointError:
    """A checkpoint file that cannot be read back: name it and the way forward."""
    detail = first_line(error)
    parent = os.path.dirname(os.path.abspath(checkpoint))
    earlier = [c for c in checkpoint_dirs(parent)
               if os.path.abspath(c) != os.path.abspath(checkpoint)]
    hint = (f"resume from an earlier one (--resume_from_checkpoint {earlier[-1]})" if earlier
            else "start over with --overwrite_output_dir")
    return CheckpointError(f"checkpoint {checkpoint!r} is damaged: {os.path.basename(file)} "
                           f"cannot be read ({detail}); {hint}")


def _changed(saved: dict, now: dict) -> str:
    """'key saved (now value), ...' for the keys whose value changed; a key the checkpoint
    does not record (saved by an older version) is not compared."""
    return ", ".join(f"{key} {saved[key]!r} (now {value!r})" for key, value in now.items()
                     if key in saved and saved[key] != value)


def _read_state(path: str) -> TrainState:
    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file) as f:
            return TrainState(**json.load(f))
    except (OSError, ValueError, TypeError) as error:  # ValueError: bad JSON or not UTF-8
        raise _damaged(path, state_file, error) from None


def _check_adapter_shape(path: str, model: torch.nn.Module) -> None:
    """The checkpoint's LoRA rank, alpha and target modules must be this model's."""
    config_file = os.path.join(path, ADAPTER_DIR, "adapter_config.json")
    try:
        with open(config_file) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise _damaged(path, config_file, error) from None
    current = model.peft_config[POLICY_ADAPTER]
    flags = {"r": "--lora_r", "lora_alpha": "--lora_alpha",
             "target_modules": "--lora_target_modules"}
    changed = []
    for key, flag in flags.items():
        was, now = saved.get(key), getattr(current, key, None)
        if key == "target_modules":
            was, now = _module_set(was), _module_set(now)
        if was is not None and was != now:
            changed.append(f"{flag} {_show(was)} (now {_show(now)})")
    if changed:
        raise CheckpointError(
            f"checkpoint {path!r} was saved with {', '.join(changed)}; its adapter does not "
            "fit this run's. Resume with the checkpoint's settings.")


def _module_set(value) -> frozenset | str | None:
    if value is None or isinstance(value, str):
        return value
    return frozenset(value)


def _show(value) -> str:
    return ",".join(sorted(value)) if isinstance(value, frozenset) else str(value)


def _load_plain(path: str, checkpoint: str):
    """`torch.load` restricted to tensors and plain containers: a tampered file cannot run code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path!r} holds more than tensors and plain data; refusing to load it "
            f"({first_line(error)})") from None
    except (OSError, RuntimeError, EOFError) as error:  # truncated or not a torch file
        raise _damaged(checkpoint, path, error) from None
