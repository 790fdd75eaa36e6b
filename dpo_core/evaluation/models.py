"""The trained model of a run and its reference, loaded as the run's plan says.

One model in memory where training kept one: the LoRA policy's reference is the same model with
the adapter switched off, or with the frozen starting adapter switched in; full fine-tuning's is
the starting model, read from disk while it is needed and freed after
(`dpo_core.modeling.reference.reference_for`, as training chose it). The forward path, the
objective and the precision are the run's too, so the pair metrics are the numbers its log
reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dpo_core.errors import ConfigError
from dpo_core.evaluation.run import TrainedRun
from dpo_core.forward.strategy import Forward
from dpo_core.modeling import backends
from dpo_core.modeling.adapters import REFERENCE_ADAPTER, load_adapter
from dpo_core.modeling.loading import (
    DTYPES,
    _load_error,
    load_base_model,
    load_run_base_model,
    resolve_dtype,
    resolve_quantization,
)
from dpo_core.modeling.reference import ReferenceContext, reference_for
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.setup import setup_forward, setup_tokenizer


@dataclass(frozen=True)
class RunModels:
    """The trained policy (on the device, under the run's autocast), its reference, and how the
    run tokenized, batched and scored pairs."""

    accelerator: Accelerator
    model: torch.nn.Module
    reference: ReferenceContext
    tokenizer: object
    use_chat_template: bool
    forward: Forward
    objective: PreferenceObjective
    dtype: torch.dtype

    @property
    def pad_token_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad_id is None else pad_id


def evaluation_precision(run: TrainedRun, dtype: str | None,
                         quantization: str | None) -> tuple[torch.dtype, bool]:
    """(compute dtype, 4-bit base weights): as given, else as the run's plan recorded them."""
    resolved = resolve_dtype(dtype) if dtype else DTYPES[run.plan.get("dtype") or "float32"]
    if quantization:
        quantize = resolve_quantization(quantization, run.full_finetuning)
    else:
        quantize = run.plan.get("quantization") == "4bit"
    if quantize and run.full_finetuning:
        raise ConfigError("--quantization 4bit: a fully fine-tuned model is evaluated as trained, "
                          "without 4-bit weights")
    return resolved, quantize


def load_run_models(run: TrainedRun, dtype: torch.dtype, quantize: bool) -> RunModels:
    """Everything the evaluation runs on, for every process of a launch (each holds the whole
    model: DDP-style; a sharded backend is refused)."""
    config = run.config
    accelerator = backends.make_accelerator(dtype, {})
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"dpo-eval runs the whole model in every process; launch it without "
                          f"{accelerator.distributed_type.value} (e.g. the ddp config)")
    tokenizer, use_chat_template = setup_tokenizer(config)
    model = _load_policy(run, dtype, quantize)
    forward = setup_forward(config, model)
    # Placed on the device and run under the run's autocast; never wrapped for DDP.
    model = accelerator.prepare_model(model, evaluation_mode=True)
    return RunModels(accelerator, model,
                     reference_for(config, model, accelerator, precomputed=True), tokenizer,
                     use_chat_template, forward,
                     PreferenceObjective.from_config(config, forward.token_logps), dtype)


def _load_policy(run: TrainedRun, dtype: torch.dtype, quantize: bool) -> torch.nn.Module:
    config = run.config
    if run.full_finetuning:  # saved whole, fp32 master weights (--dtype is the autocast)
        return load_base_model(run.directory, dtype=torch.float32, quantize_4bit=False,
                               attn_implementation=config.attn_implementation,
                               trust_remote_code=config.trust_remote_code).eval()
    model = load_adapter(load_run_base_model(config, dtype, quantize_4bit=quantize),
                         run.directory, config.model_name)
    if config.adapter_path:  # the reference: the starting adapter, frozen, on the same base
        try:
            model.load_adapter(config.adapter_path, adapter_name=REFERENCE_ADAPTER)
        except (OSError, ValueError) as error:
            raise _load_error("starting adapter", config.adapter_path, error) from None
    return model.eval()
