"""Which distributed backend a run uses, and FSDP2 on machines with or without GPUs.

`accelerate launch --config_file examples/accelerate/fsdp.yaml` exports the config as
environment variables (`ACCELERATE_USE_FSDP`, `FSDP_VERSION`, ...). On GPUs Accelerate turns
them into an FSDP run; on a machine without GPUs it silently runs plain `MULTI_CPU` data
parallelism instead (its `AcceleratorState` only applies an FSDP plugin to GPU-like backends),
although FSDP2's `fully_shard` works over gloo. `make_accelerator` closes that gap: it
switches the CPU state to FSDP with the plugin read from the same variables, so
`accelerator.prepare` shards the model with Accelerate's own FSDP2 code (`fully_shard` per
decoder layer, then the embeddings, the head and the root) on CPU and GPU alike. A run that
asks for a backend and would get another stops with a `ConfigError` instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError


def requested_backend() -> DistributedType | None:
    """The backend the launcher's config asks for (FSDP or DEEPSPEED), else None."""
    for variable, backend in (("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                              ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(variable, "false").lower() == "true":
            return backend
    return None


def launched_without_accelerator() -> bool:
    """One of several processes (torchrun, `accelerate launch`) on a machine with no GPU.
    Accelerate starts a CPU (gloo) process group only when told it runs on the CPU;
    otherwise every process would train alone, all writing into one output_dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, NPU, MPS, ...
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def mixed_precision_for(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(dtype: torch.dtype, tracker_options: dict) -> Accelerator:
    """The run's Accelerator, running the backend the launcher asked for (FSDP2 included on a
    machine without GPUs): mixed precision from the compute dtype, CPU process groups where
    several processes share a machine without an accelerator. Raises ConfigError when the
    asked-for backend cannot run here."""
    on_cpu = launched_without_accelerator()
    wanted = requested_backend()
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision_for(dtype), cpu=on_cpu,
                                  **tracker_options)
    except ImportError as error:  # e.g. a DeepSpeed config without deepspeed installed
        raise ConfigError(f"the Accelerate config asks for "
                          f"{wanted.value if wanted else 'a backend'} that cannot start here: "
                          f"{error}") from None
    if on_cpu and wanted == DistributedType.FSDP:
        _switch_to_fsdp(accelerator)
    if wanted is not None and accelerator.distributed_type != wanted:
        raise ConfigError(_fallback_message(wanted, accelerator))
    return accelerator


def _switch_to_fsdp(accelerator: Accelerator) -> None:
    """Turn a MULTI_CPU (gloo) state into FSDP2, as Accelerate does for GPUs. FSDP1 needs a
    device per process and is left to the fallback error."""
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2 or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # AcceleratorState and PartialState keep separate shared dicts; Accelerate's own switch to
    # FSDP writes both, and gather/reduce read the PartialState one.
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def _fallback_message(wanted: DistributedType, accelerator: Accelerator) -> str:
    got, processes = accelerator.distributed_type, accelerator.num_processes
    reasons = []
    if processes < 2:
        reasons.append(f"it runs {processes} process: launch with --num_processes 2 or more, "
                       "or run `python train.py` without the config")
    if wanted == DistributedType.FSDP and os.environ.get("FSDP_VERSION", "1") != "2":
        reasons.append("without GPUs only FSDP2 can run: set fsdp_version: 2 in the config")
    if wanted == DistributedType.DEEPSPEED and launched_without_accelerator():
        reasons.append("DeepSpeed needs GPUs here: use examples/accelerate/fsdp.yaml")
    why = "; ".join(reasons) or "see the Accelerate config"
    return (f"the Accelerate config asks for {wanted.value}, but this run would use "
            f"{got.value} instead ({why}). Stopping rather than running unsharded.")


def prepare_for_backend(accelerator: Accelerator, batch_size: int) -> None:
    """Accelerate reads DeepSpeed's micro-batch size off the dataloaders given to prepare();
    this loop prepares its own, so it is set here."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = batch_size


def prepare_model(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare` for the model and its optimizer (under FSDP2 they must go
    together: the optimizer is pointed at the sharded parameters). Under FSDP every module is
    marked as FSDP-managed, the flag transformers reads to keep `generate` on all processes
    stepping together (`synced_gpus`) until the longest reply is done."""
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1:
        for module in model.modules():
            module._is_fsdp_managed_module = True
    return model, optimizer


@contextmanager
def root_weights_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside: an FSDP2 model's root unit holds its weights whole. FSDP2 gathers a unit's
    weights in a hook on that unit's forward, but `generate` enters below the root (the PEFT
    model calls its inner model's `generate`), so the root's own weights (those in no
    sub-unit: the final norm) would stay sharded. Every process must enter it together."""
    if not is_fsdp2_model(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def whole_tensor(value):
    """`value` as a plain tensor: under FSDP2 a gradient norm comes back as a (replicated)
    DTensor, which cannot be stacked with plain tensors or read with `.tolist()`."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def fsdp_version(accelerator: Accelerator) -> int | None:
    """1 or 2 under FSDP, else None."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.state.fsdp_plugin.fsdp_version


def is_fsdp2_model(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2's `fully_shard` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """Whether no process holds all the weights, so any forward pass (generation, evaluation)
    needs every process to take part."""
    if accelerator.num_processes < 2:
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def sharding_summary(model: torch.nn.Module) -> dict:
    """How an FSDP2 model is split: decoder layers that are their own `fully_shard` unit, and
    the share of all weight elements this process holds."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # transformers names its decoder layer classes in `_no_split_modules` (on the inner model:
    # the PEFT and FSDP wrappers do not pass the attribute on).
    layer_classes = {name for module in model.modules()
                     for name in getattr(module, "_no_split_modules", None) or []}
    # fully_shard swaps a module's class for a subclass (FSDPLlamaDecoderLayer): match the MRO.
    layers = [m for m in model.modules()
              if any(cls.__name__ in layer_classes for cls in type(m).__mro__)]
    local = total = 0
    for param in model.parameters():
        total += param.numel()
        local += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
    return {"decoder_layers": len(layers),
            "decoder_layers_sharded": sum(isinstance(m, FSDPModule) for m in layers),
            "local_weight_fraction": local / max(total, 1)}


def describe_backend(accelerator: Accelerator, model: torch.nn.Module) -> str:
    """The line the main process prints at start-up: backend, processes, device, sharding."""
    kind = accelerator.distributed_type.value
    version = fsdp_version(accelerator)
    name = f"FSDP{version}" if version else kind
    parts = [f"Backend: {name} ({kind}), {accelerator.num_processes} process(es) on "
             f"{accelerator.device.type}"]
    if is_fsdp2_model(model):
        split = sharding_summary(model)
        parts.append(f"{split['decoder_layers_sharded']} of {split['decoder_layers']} decoder "
                     f"layers sharded as their own units, this process holds "
                     f"{split['local_weight_fraction']:.0%} of the weights")
    return ", ".join(parts) + "."


def check_backend(config: TrainConfig, state, quantize: bool) -> None:
    """Refuse, naming the fix, what this loop cannot do correctly under FSDP or DeepSpeed
    (`state`: the AcceleratorState):

    - 4-bit weights are not set up for sharding (no bnb_4bit_quant_storage);
    - full fine-tuning under DeepSpeed or FSDP1 is untested (FSDP2 runs it, tested on CPU);
    - FSDP1 (untested, GPU-only): resumable checkpoints and generation (samples, the demo's
      evaluation) are only built for FSDP2, and frozen and LoRA weights share its units;
    - DeepSpeed: checkpoints hold no DeepSpeed engine state; ZeRO-3 shards the weights that
      generation on one process would need; DeepSpeed steps its optimizer inside backward,
      so no accumulation across this loop's micro-batches, and a non-finite step is applied
      before the loop could skip it;
    - a moving reference (--sync_ref_model) is saved and restored whole, not as shards
      (tested with one process and DDP).
    """
    if state.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    fsdp = state.distributed_type == DistributedType.FSDP
    fsdp1 = fsdp and state.fsdp_plugin.fsdp_version == 1
    zero_stage = 0 if fsdp else state.deepspeed_plugin.zero_stage
    needs = []
    if quantize:
        needs.append("--quantization none (use the DDP config for 4-bit QLoRA)")
    if config.finetuning_type == "full" and (fsdp1 or not fsdp):
        needs.append("--finetuning_type lora (full fine-tuning is tested with one process, "
                     "DDP and FSDP2: use examples/accelerate/fsdp.yaml for it)")
    if (fsdp1 or not fsdp) and (config.save_steps or config.resume_from_checkpoint):
        needs.append("--save_steps 0 and no --resume_from_checkpoint (resumable checkpoints "
                     "are for one process, DDP and FSDP2, and the final adapter is still saved)")
    if (fsdp1 or zero_stage == 3) and (config.num_sample_prompts or config.demo):
        needs.append("--num_sample_prompts 0 and no --demo (generation with sharded weights "
                     "is built for FSDP2)")
    if fsdp1 and not state.fsdp_plugin.use_orig_params:
        needs.append("fsdp_use_orig_params: true in the Accelerate config (frozen and LoRA "
                     "weights share FSDP units)")
    if not fsdp and config.gradient_accumulation_steps > 1:
        needs.append("--gradient_accumulation_steps 1 (raise --batch_size or add processes)")
    if not fsdp and config.skip_nonfinite_steps:
        needs.append("--skip_nonfinite_steps 0")
    if config.sync_ref_model:
        needs.append("no --sync_ref_model (its moving reference is checkpointed whole, not "
                     "sharded: use one process or the DDP config)")
    if needs:
        backend = (f"FSDP{state.fsdp_plugin.fsdp_version}" if fsdp
                   else f"DeepSpeed ZeRO-{zero_stage}")
        raise ConfigError(f"under {backend} this trainer needs " + "; ".join(needs))
