"""Which distributed backend a run gets, and what this trainer can and cannot do under it."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dpo_core.config import ConfigError, TrainConfig


def launched_without_accelerator() -> bool:
    """One of several processes (torchrun, `accelerate launch --multi_gpu`) on a machine with
    no GPU. Accelerate starts a CPU (gloo) process group only when told it runs on the CPU;
    otherwise every process would train alone, all writing into one output_dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, NPU, MPS, ...
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def mixed_precision_for(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(dtype: torch.dtype, tracker_options: dict) -> Accelerator:
    """The run's Accelerator: mixed precision from the compute dtype, CPU process groups where
    several processes share a machine without an accelerator."""
    return Accelerator(mixed_precision=mixed_precision_for(dtype),
                       cpu=launched_without_accelerator(), **tracker_options)


def check_backend(config: TrainConfig, state, quantize: bool) -> None:
    """Refuse, naming the fix, what this loop cannot do correctly under FSDP or DeepSpeed
    (`state`: the AcceleratorState). Untested on GPUs so far, so kept narrow:

    - resumable checkpoints hold one replicated optimizer state (exact under DDP), which FSDP
      and DeepSpeed shard; the final adapter is saved either way;
    - 4-bit weights are not set up for sharding (no bnb_4bit_quant_storage);
    - samples and the demo's evaluation run on the main process alone, which cannot work
      while the weights are sharded (FSDP, ZeRO-3);
    - DeepSpeed steps its optimizer inside backward: no accumulation across this loop's
      micro-batches, and a non-finite step is applied before the loop could skip it.
    """
    if state.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    fsdp = state.distributed_type == DistributedType.FSDP
    zero_stage = 0 if fsdp else state.deepspeed_plugin.zero_stage
    needs = []
    if quantize:
        needs.append("--quantization none (use the DDP config for 4-bit QLoRA)")
    if config.save_steps or config.resume_from_checkpoint:
        needs.append("--save_steps 0 and no --resume_from_checkpoint (checkpoints are for "
                     "single-process and DDP runs, and the final adapter is still saved)")
    if (fsdp or zero_stage == 3) and (config.num_sample_prompts or config.demo):
        needs.append("--num_sample_prompts 0 and no --demo (they generate on one process)")
    if fsdp and state.fsdp_plugin.fsdp_version == 1 and not state.fsdp_plugin.use_orig_params:
        needs.append("fsdp_use_orig_params: true in the Accelerate config (frozen and LoRA "
                     "weights share FSDP units)")
    if not fsdp and config.gradient_accumulation_steps > 1:
        needs.append("--gradient_accumulation_steps 1 (raise --batch_size or add processes)")
    if not fsdp and config.skip_nonfinite_steps:
        needs.append("--skip_nonfinite_steps 0")
    if needs:
        backend = "FSDP" if fsdp else f"DeepSpeed ZeRO-{zero_stage}"
        raise ConfigError(f"under {backend} this trainer needs " + "; ".join(needs))


def prepare_for_backend(accelerator: Accelerator, batch_size: int) -> None:
    """Accelerate reads DeepSpeed's micro-batch size off the dataloaders given to prepare();
    this loop prepares its own, so it is set here."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = batch_size
