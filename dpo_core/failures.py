"""Why a run stopped in the middle, and what the user can do about it."""

from __future__ import annotations

from dpo_core.checkpoint import checkpoint_dirs
from dpo_core.config import TrainConfig
from dpo_core.errors import RunFailure


class NonFiniteError(RunFailure, RuntimeError):
    """The loss or the gradient stopped being finite; the message names the step."""


class DeviceMemoryError(RunFailure, RuntimeError):
    """The accelerator ran out of memory; the message names the step and what to change."""


def last_checkpoint_note(output_dir: str) -> str:
    saved = checkpoint_dirs(output_dir)
    newest = saved[-1] if saved else "none (lower --save_steps to keep one)"
    return f"Last good checkpoint: {newest}."


def out_of_memory_message(config: TrainConfig, step: int, checkpointing: bool) -> str:
    """What to change when step `step` did not fit: first what can resume from the last
    checkpoint, then what changes the data order and so means starting over."""
    parts = [f"step {step}: out of device memory. {last_checkpoint_note(config.output_dir)}"]
    if not checkpointing:
        parts.append("Add --gradient_checkpointing (much less activation memory, slower) and "
                     "continue with --resume_from_checkpoint latest.")
    restart = []
    if config.batch_size > 1:
        smaller = config.batch_size // 2 if config.batch_size % 2 == 0 else 1
        accumulation = config.gradient_accumulation_steps * config.batch_size // smaller
        restart.append(f"--batch_size {smaller} --gradient_accumulation_steps {accumulation} "
                       "(the same pairs per step)")
    restart.append(f"a shorter --max_length (now {config.max_length})")
    parts.append(("Or start" if not checkpointing else "Start") + " over (--overwrite_output_dir)"
                 " with " + " or ".join(restart) + ".")
    return " ".join(parts)


def nonfinite_error(step: int, loss: float, grad_norm: float, output_dir: str) -> NonFiniteError:
    return NonFiniteError(
        f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; stopping. "
        f"{last_checkpoint_note(output_dir)} Try a lower --learning_rate, or "
        "--skip_nonfinite_steps N to skip such steps, and --resume_from_checkpoint latest.")
