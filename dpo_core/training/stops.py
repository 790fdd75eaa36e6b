"""What stops a run before its end, and what it says and keeps: Ctrl-C, a non-finite step,
running out of device memory.

Ctrl-C stops at the next safe point instead of mid-step. The first SIGINT only sets a flag;
the loop checks it after each optimizer step (when the weights, optimizer and data position
agree), saves a checkpoint and raises `TrainingInterrupted` (exit status 130) with the command
that resumes. A second Ctrl-C interrupts at once, as usual. Under several processes every
process gets the signal from the terminal, but not necessarily at the same step: `requested`
agrees across processes so that they all stop after the same step, one step after the Ctrl-C
(the agreement is read a step late, so that it never makes the host wait for the device).

A non-finite loss or gradient (`nonfinite_error`) and an out-of-memory step
(`out_of_memory_message`) stop the run with a message naming the step, the last good
checkpoint and what to change.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

import torch
import torch.distributed as dist

from dpo_core.config.train import TrainConfig
from dpo_core.errors import NonFiniteError, TrainingInterrupted
from dpo_core.run_files import checkpoint_dirs
from dpo_core.training.checkpoint import save_checkpoint

RESUME_FLAG = "--resume_from_checkpoint"


class StopOnInterrupt:
    """Context manager: while active, Ctrl-C asks the loop to stop at its next safe point."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None
        # Several processes: the started "any process interrupted?" collective, not read yet.
        self._agreement: tuple[torch.Tensor, dist.Work] | None = None

    def __enter__(self) -> StopOnInterrupt:
        # Signal handlers can only be set from the main thread (e.g. not in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Give Ctrl-C back its usual meaning (e.g. once the loop is over); idempotent."""
        if self._agreement is not None:  # every process started it: complete it everywhere
            self._agreement[1].wait()
            self._agreement = None
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pressed:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.pressed = True
        # A plain print: a signal handler must not take the logging module's locks.
        print("\nCtrl-C: stopping after this step (press it again to stop at once).",
              file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """Whether to stop after this step: whether Ctrl-C was pressed. Under several
        processes, whether any process had been interrupted by the end of the previous step:
        the collective that agrees on it starts after a step and is read after the next, so
        no process waits each step for the work it has just queued on the device, and every
        process stops after the same step, the one after the Ctrl-C's. A collective call:
        every process makes it once per step."""
        if accelerator.num_processes == 1:
            return self.pressed
        agreed, self._agreement = self._agreement, _start_any(self.pressed, accelerator.device)
        return agreed is not None and _finish_any(agreed)


def _start_any(flag: bool, device: torch.device) -> tuple[torch.Tensor, dist.Work]:
    """Start the max of `flag` over every process (asynchronously)."""
    value = torch.tensor([float(flag)], device=device)
    return value, dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)


def _finish_any(started: tuple[torch.Tensor, dist.Work]) -> bool:
    value, work = started
    work.wait()
    return bool(value.item())


def checkpoint_and_stop(config, accelerator, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, state, total_steps: int,
                        saved_now: bool, reference=None) -> NoReturn:
    """After Ctrl-C, at a step boundary: a checkpoint of this step (unless
    --no-save_on_interrupt, or one was just saved on schedule), then TrainingInterrupted
    saying how to resume. `config`: the TrainConfig; `state`: the TrainState; `reference`: the
    moving reference's `ReferenceSync` (--sync_ref_model), saved with it."""
    checkpoint = None
    if saved_now or config.save_on_interrupt:
        checkpoint = os.path.join(config.output_dir, f"checkpoint-{state.step}")
        if not saved_now:
            save_checkpoint(config.output_dir, accelerator, model, optimizer, state,
                            config.save_total_limit, reference)
    newest = checkpoint_dirs(config.output_dir)
    raise stopped(state.step, total_steps, checkpoint, newest[-1] if newest else None)


def stopped(step: int, total_steps: int, checkpoint: str | None,
            last_checkpoint: str | None) -> TrainingInterrupted:
    """What the user reads after a Ctrl-C: where the run stopped, what was kept, the command
    that continues it."""
    if checkpoint:
        kept = f"saved {checkpoint}."
    else:
        kept = (f"no checkpoint saved (--no-save_on_interrupt); the newest is "
                f"{last_checkpoint or 'none, so a new run starts from step 0'}.")
    return TrainingInterrupted(
        f"Stopped by Ctrl-C after step {step} of {total_steps}; {kept}\n"
        f"Continue with:\n  {resume_command()}")


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same flags, resuming from the newest
    checkpoint (an earlier --resume_from_checkpoint is replaced)."""
    args = list(sys.argv if argv is None else argv)
    kept, skip = [], False
    for arg in args[1:]:
        if skip:
            skip = False
        elif arg == RESUME_FLAG:
            skip = True
        elif not arg.startswith(RESUME_FLAG + "="):
            kept.append(arg)
    # `python train.py`, or an installed console script (`dpo-train`) by its name.
    program = ["python", args[0]] if args[0].endswith(".py") else [os.path.basename(args[0])]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        program = ["accelerate", "launch", "<your launch options>", args[0]]
    return " ".join(shlex.quote(a) if not a.startswith("<") else a
                    for a in [*program, *kept, RESUME_FLAG, "latest"])


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
