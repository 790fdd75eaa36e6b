"""Which network is the DPO reference, as a context: `with reference(policy) as model:` gives
the module to run the reference pass on, and undoes whatever it switched on exit.

- `adapter_disabled`: a fresh LoRA adapter; the reference is the base model (adapter off).
- `AdapterSwitched`: DPO started from an SFT adapter; the reference is a frozen copy of that
  adapter, a second adapter on the same base, switched in for the pass and out after it.
- `FrozenCopy`: full fine-tuning whose reference could not be precomputed; a second,
  non-trainable model in memory (under ZeRO-3 partitioned like the policy, in its own engine).
- `ReloadedModel`: full fine-tuning with precomputed reference log-probs; the reference is read
  from disk only if something outside the training loop (samples, a before/after evaluation)
  needs it, and freed afterwards.
- `policy_itself`: the policy as it is now; only correct before the first optimizer step, which
  is when the precomputed reference pass of full fine-tuning runs.

A moving reference (TR-DPO, `--sync_ref_model`) is one of these whose weights `ReferenceSync`
mixes toward the policy's every `--ref_model_sync_steps` steps: with LoRA a second adapter on the
same base (`AdapterSwitched`; it starts as a copy of the policy adapter, i.e. the base model for
a fresh adapter), with full fine-tuning the `FrozenCopy`. Since the reference then moves away
from where training started, `starting_model_for` gives the start itself again, for samples.md
and a before/after evaluation (`ReloadedAdapter` for a starting adapter).

Every context is entered under `torch.no_grad()` by its callers; none of them trains.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from dpo_core.config.train import TrainConfig
from dpo_core.errors import CheckpointError
from dpo_core.modeling.adapters import POLICY_ADAPTER, REFERENCE_ADAPTER, policy_weight_of
from dpo_core.modeling.backends import is_deepspeed_engine, partitioned_model_runner
from dpo_core.modeling.loading import load_run_base_model

# (policy model, possibly wrapped by DDP/Accelerate) -> context yielding the reference module.
ReferenceContext = Callable[[torch.nn.Module], AbstractContextManager[torch.nn.Module]]


@contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The policy with its LoRA adapter switched off: the base model, no second copy."""
    with extract_model_from_parallel(model).disable_adapter():
        yield model


def policy_itself(model: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
    """The policy unchanged: the reference only while no optimizer step has been taken."""
    return nullcontext(model)


@dataclass(frozen=True)
class AdapterSwitched:
    """Run `reference` (a frozen adapter on the policy's base) instead of the trained `policy`
    adapter; the policy adapter is active again on exit, trainable as before."""

    reference: str
    policy: str

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        peft_model = extract_model_from_parallel(model)
        # inference_mode: switching in must not make the frozen copy's weights trainable.
        peft_model.set_adapter(self.reference, inference_mode=True)
        try:
            yield model
        finally:
            # Makes the policy adapter trainable again and keeps the reference frozen.
            peft_model.set_adapter(self.policy)


@dataclass(frozen=True)
class ReloadedAdapter:
    """The adapter at `path` (a starting SFT adapter), read from disk again as a temporary
    frozen adapter on the policy's base and deleted on exit, when the reference adapter no
    longer holds it (TR-DPO moved it)."""

    path: str
    policy: str = POLICY_ADAPTER
    name: str = "start"

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        peft_model = extract_model_from_parallel(model)
        peft_model.load_adapter(self.path, adapter_name=self.name, is_trainable=False)
        peft_model.set_adapter(self.name, inference_mode=True)
        try:
            yield model
        finally:
            peft_model.set_adapter(self.policy)
            peft_model.delete_adapter(self.name)


@dataclass(frozen=True)
class FrozenCopy:
    """A second model, frozen, holding the weights the policy started from."""

    model: torch.nn.Module

    def __call__(self, policy: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]:
        return nullcontext(self.model)


@dataclass(frozen=True)
class ReloadedModel:
    """`load()` -> the starting weights, frozen, on the policy's device; `autocast` is the
    policy's mixed-precision context, so both run in one precision. The copy is freed on exit."""

    load: Callable[[], torch.nn.Module]
    autocast: Callable[[], AbstractContextManager] = nullcontext

    @contextmanager
    def __call__(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        model = self.load()
        try:
            with self.autocast():
                yield model
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _starting_weights(config: TrainConfig, model: torch.nn.Module,
                      accelerator: Accelerator) -> ReloadedModel:
    """Full fine-tuning's starting model, read from disk when entered (on the policy's device,
    in its dtype: fp32 master weights), frozen."""
    weights_dtype = next(model.parameters()).dtype

    def load() -> torch.nn.Module:
        model = load_run_base_model(config, weights_dtype).to(
            accelerator.device).eval().requires_grad_(False)
        return partitioned_model_runner(accelerator, model)  # ZeRO-3: in an engine of its own

    return ReloadedModel(load=load, autocast=accelerator.autocast)


def reference_for(config: TrainConfig, model: torch.nn.Module, accelerator: Accelerator, *,
                  precomputed: bool) -> ReferenceContext:
    """The reference of a run that trains `model`, before any optimizer step. `precomputed`:
    whether its log-probs are computed before training; then full fine-tuning keeps no second
    model (the pass itself runs on `policy_itself`, and the starting weights are read from
    disk again only if samples or a before/after evaluation need them). With LoRA, a moving
    reference (--sync_ref_model) is the reference adapter `build_policy` added."""
    if config.finetuning_type == "lora":
        if config.adapter_path or config.sync_ref_model:
            return AdapterSwitched(reference=REFERENCE_ADAPTER, policy=POLICY_ADAPTER)
        return adapter_disabled
    starting = _starting_weights(config, model, accelerator)
    if precomputed:
        return starting
    copy = starting.load()
    if is_deepspeed_engine(copy):
        return FrozenCopy(copy)
    # Prepared for evaluation: under the policy's autocast, never wrapped for DDP.
    return FrozenCopy(accelerator.prepare_model(copy, evaluation_mode=True))


def starting_model_for(config: TrainConfig, model: torch.nn.Module, accelerator: Accelerator,
                       reference: ReferenceContext) -> ReferenceContext:
    """The model training started from, as a context: the reference itself unless it moves
    (--sync_ref_model), else the base model (fresh adapter), the starting adapter read again
    (--adapter_path) or the starting weights read again (full fine-tuning)."""
    if not config.sync_ref_model:
        return reference
    if config.finetuning_type == "full":
        return _starting_weights(config, model, accelerator)
    if config.adapter_path:
        return ReloadedAdapter(config.adapter_path)
    return adapter_disabled


@dataclass(frozen=True)
class ReferenceSync:
    """TR-DPO's moving reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
    Good Alignment", arXiv:2404.09656), trl's `sync_ref_model`: after every `every`-th optimizer
    step each reference weight moves toward its policy counterpart,

        reference <- alpha * policy + (1 - alpha) * reference      (alpha 1: a copy)

    as trl's `SyncRefModelCallback` computes it (`mul_(1 - alpha).add_(policy, alpha=alpha)`,
    exact for alpha 1). `weights`: name -> (reference weight, policy weight). With LoRA they
    are the adapters' A and B factors, mixed one by one, so the soft update is the one of the
    LoRA parameters: for alpha < 1 the reference's B A is not the mix of the two products
    (docs/trl-options.md works it out)."""

    alpha: float
    every: int
    weights: dict[str, tuple[Tensor, Tensor]]

    def due(self, step: int) -> bool:
        """Whether the reference moves after optimizer step `step` (1-based)."""
        return step % self.every == 0

    @torch.no_grad()
    def __call__(self) -> None:
        for reference, policy in self.weights.values():
            reference.mul_(1.0 - self.alpha).add_(policy, alpha=self.alpha)

    def state_dict(self) -> dict[str, Tensor]:
        """The reference weights by name, on the CPU (what a checkpoint saves)."""
        return {name: reference.detach().to("cpu", copy=True).contiguous()
                for name, (reference, _) in self.weights.items()}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Tensor], checkpoint: str) -> None:
        """Restore the reference weights a checkpoint saved; CheckpointError when they are not
        this run's reference's."""
        if saved.keys() != self.weights.keys() or any(
                saved[name].shape != reference.shape
                for name, (reference, _) in self.weights.items()):
            raise CheckpointError(
                f"checkpoint {checkpoint!r} holds a moving reference of other weights than "
                "this run's; resume with the settings in its run's training_config.json")
        for name, (reference, _) in self.weights.items():
            reference.copy_(saved[name])


def reference_sync(config: TrainConfig, model: torch.nn.Module,
                   reference: ReferenceContext) -> ReferenceSync | None:
    """The `ReferenceSync` of a --sync_ref_model run (None otherwise): the reference adapter's
    weights against the policy adapter's, or the frozen copy's against the policy's."""
    if not config.sync_ref_model:
        return None
    policy = dict(extract_model_from_parallel(model).named_parameters())
    if isinstance(reference, FrozenCopy):
        pairs = {name: (weight, policy[name])
                 for name, weight in reference.model.named_parameters()}
    else:
        pairs = {name: (weight, policy[counterpart]) for name, weight in policy.items()
                 if (counterpart := policy_weight_of(name))}
    return ReferenceSync(config.ref_model_mixup_alpha, config.ref_model_sync_steps, pairs)
