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

from dpo_core.config.train import TrainConfig
from dpo_core.modeling.adapters import POLICY_ADAPTER, REFERENCE_ADAPTER
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


def reference_for(config: TrainConfig, model: torch.nn.Module, accelerator: Accelerator, *,
                  precomputed: bool) -> ReferenceContext:
    """The reference of a run that trains `model`, before any optimizer step. `precomputed`:
    whether its log-probs are computed before training; then full fine-tuning keeps no second
    model (the pass itself runs on `policy_itself`, and the starting weights are read from
    disk again only if samples or a before/after evaluation need them)."""
    if config.finetuning_type == "lora":
        if config.adapter_path:
            return AdapterSwitched(reference=REFERENCE_ADAPTER, policy=POLICY_ADAPTER)
        return adapter_disabled
    weights_dtype = next(model.parameters()).dtype  # the policy's (fp32 master weights)

    def load() -> torch.nn.Module:
        model = load_run_base_model(config, weights_dtype).to(
            accelerator.device).eval().requires_grad_(False)
        return partitioned_model_runner(accelerator, model)  # ZeRO-3: in an engine of its own

    if precomputed:
        return ReloadedModel(load=load, autocast=accelerator.autocast)
    copy = load()
    if is_deepspeed_engine(copy):
        return FrozenCopy(copy)
    # Prepared for evaluation: under the policy's autocast, never wrapped for DDP.
    return FrozenCopy(accelerator.prepare_model(copy, evaluation_mode=True))
