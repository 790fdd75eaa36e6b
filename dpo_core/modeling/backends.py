"""Which distributed backend a run uses: DDP, FSDP2 or DeepSpeed ZeRO-2/3, on machines with
or without GPUs, and what this loop needs from each.

`accelerate launch --config_file examples/accelerate/<backend>.yaml` exports the config as
environment variables (`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED`, ...). On GPUs
Accelerate turns them into the asked-for backend. On a machine without GPUs (where these
backends are tested) it would run plain `MULTI_CPU` data parallelism instead; `make_accelerator`
closes that gap: DeepSpeed is started over gloo through Accelerate's public arguments, FSDP2 by
switching the CPU state (`library_internals`, the one place that touches private internals).
A run that asks for a backend and would get another stops with a `ConfigError` instead.

Under DeepSpeed the engine owns what the loop does itself elsewhere: it accumulates gradients
over `gradient_accumulation_steps` micro-batches (the loop marks the last one as the boundary),
clips them by `gradient_clipping` and steps its optimizer inside the last backward.
`configure_deepspeed` fills those entries from --gradient_accumulation_steps and
--max_grad_norm, so that one flag means the same on every backend.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.modeling import library_internals

SHIPPED_CONFIGS = "examples/accelerate"


def requested_backend() -> DistributedType | None:
    """The backend the launcher's config asks for (FSDP or DEEPSPEED), else None."""
    for variable, backend in (("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                              ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(variable, "false").lower() == "true":
            return backend
    return None


def no_accelerator() -> bool:
    """This machine has no GPU (nor any other accelerator torch knows)."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, NPU, MPS, ...
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def launched_without_accelerator() -> bool:
    """One of several processes (torchrun, `accelerate launch`) on a machine with no GPU.
    Accelerate starts a CPU (gloo) process group only when told it runs on the CPU;
    otherwise every process would train alone, all writing into one output_dir."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and no_accelerator()


def mixed_precision_for(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(dtype: torch.dtype, tracker_options: dict) -> Accelerator:
    """The run's Accelerator, running the backend the launcher asked for (FSDP2 and DeepSpeed
    included on a machine without GPUs): mixed precision from the compute dtype, CPU process
    groups where several processes share a machine without an accelerator. Raises
    ConfigError when the asked-for backend cannot run here."""
    on_cpu = launched_without_accelerator()
    wanted = requested_backend()
    options: dict = {"cpu": on_cpu}
    if wanted == DistributedType.DEEPSPEED:
        _check_deepspeed_can_start()
        if no_accelerator():
            library_internals.skip_deepspeed_shared_memory_kernel()
            # Accelerate hands DeepSpeed the backend it is given: gloo, the one that runs here.
            options = {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    accelerator = Accelerator(mixed_precision=mixed_precision_for(dtype), **options,
                              **tracker_options)
    if on_cpu and wanted == DistributedType.FSDP:
        library_internals.switch_to_fsdp2(accelerator)
    if wanted is not None and accelerator.distributed_type != wanted:
        raise ConfigError(_fallback_message(wanted, accelerator))
    return accelerator


def _check_deepspeed_can_start() -> None:
    """A DeepSpeed config needs deepspeed installed and a launcher that started the processes."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "the Accelerate config asks for DeepSpeed, which is not installed: install it "
            "with `pip install -e \".[deepspeed]\"` (or `pip install deepspeed`), or use "
            f"{SHIPPED_CONFIGS}/fsdp.yaml, which needs nothing extra")
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            "the environment asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED) but no launcher "
            "started this process: run `accelerate launch --config_file "
            f"{SHIPPED_CONFIGS}/deepspeed_zero3.yaml train.py ...`")


def _fallback_message(wanted: DistributedType, accelerator: Accelerator) -> str:
    got, processes = accelerator.distributed_type, accelerator.num_processes
    reasons = []
    if processes < 2:
        reasons.append(f"it runs {processes} process: launch with --num_processes 2 or more, "
                       "or run `python train.py` without the config")
    if wanted == DistributedType.FSDP and os.environ.get("FSDP_VERSION", "1") != "2":
        reasons.append("without GPUs only FSDP2 can run: set fsdp_version: 2 in the config")
    why = "; ".join(reasons) or "see the Accelerate config"
    return (f"the Accelerate config asks for {wanted.value}, but this run would use "
            f"{got.value} instead ({why}). Stopping rather than running unsharded.")


def configure_deepspeed(accelerator: Accelerator, config: TrainConfig) -> None:
    """Under DeepSpeed, fill the engine's micro-batch size, accumulation and clipping from
    the flags (Accelerate would read the first off dataloaders, which this loop does not give
    it). `check_backend` has already refused a config that sets them otherwise."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps  # agree
    for key, value in _deepspeed_settings(config).items():
        ds_config[key] = value


def _deepspeed_settings(config: TrainConfig) -> dict:
    """The DeepSpeed config entries a flag decides: its value (0: no clipping)."""
    return {"gradient_accumulation_steps": config.gradient_accumulation_steps,
            "gradient_clipping": float(config.max_grad_norm)}


@contextmanager
def micro_batch(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> Iterator[None]:
    """The forward and backward of one micro-batch of an optimizer step. Before the step's
    last one gradients stay on each process: DDP and FSDP2 skip their reduction (`no_sync`),
    a DeepSpeed engine is told this is not the accumulation boundary, so it neither reduces
    across processes nor steps. At the last one DeepSpeed clips and steps inside backward."""
    accelerator.sync_gradients = last
    try:
        with nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """`accelerator.backward` of a loss already weighted as its share of the whole step (so
    the micro-batches' gradients sum to the step's). DeepSpeed would divide it by
    gradient_accumulation_steps once more; it is told not to."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


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


def zero_stage(accelerator: Accelerator) -> int | None:
    """DeepSpeed's ZeRO stage (0-3) under DeepSpeed, else None."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.zero_stage


def is_fsdp2_model(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2's `fully_shard` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_deepspeed_engine(model: torch.nn.Module) -> bool:
    """Whether `model` is the DeepSpeed engine `accelerator.prepare` returns."""
    deepspeed = sys.modules.get("deepspeed")  # never imported by a run without DeepSpeed
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def is_zero3_model(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitioned `model`'s weights: each process holds a slice of every
    weight (`ds_tensor`), gathered whole only inside its own module's forward."""
    return any(hasattr(param, "ds_tensor") for param in model.parameters())


def forward_is_collective(model: torch.nn.Module) -> bool:
    """Whether a forward pass of `model` needs every process: its weights are sharded across
    processes (FSDP2, ZeRO-3) and gathered for each module as it runs, so all processes must
    run the same forwards (generation: until the longest reply is done)."""
    import torch.distributed as dist

    return ((is_fsdp2_model(model) or is_zero3_model(model)) and dist.is_initialized()
            and dist.get_world_size() > 1)


def partitioned_model_runner(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model`, a frozen model loaded beside the policy (a reference copy), ready to run.
    Under ZeRO-3 transformers loads every model partitioned (under DeepSpeed's `zero.Init`),
    and a partitioned model runs only inside a DeepSpeed engine, which gathers each layer's
    weights for its forward: it gets an engine of its own, without optimizer, as the policy
    has. Any other model is returned as it is."""
    if not is_zero3_model(model):
        return model
    import deepspeed

    # The run's config, filled in by `accelerator.prepare` (batch sizes, stage, precision).
    config = {key: value for key, value in accelerator.state.deepspeed_plugin.deepspeed_config
              .items() if key not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeed's returns nothing
    return engine


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """Whether no process holds all the weights, so any forward pass (generation, evaluation)
    needs every process to take part."""
    if accelerator.num_processes < 2:
        return False
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def local_weight_fraction(model: torch.nn.Module) -> float:
    """The share of all weight elements this process holds (FSDP2: its DTensor shards;
    ZeRO-3: its partitions; otherwise every weight)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # ZeRO-3: `param` itself is an empty placeholder
            total += param.ds_numel
            local += param.ds_tensor.numel()
        else:
            total += param.numel()
            local += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
    return local / max(total, 1)


def fsdp2_layer_units(model: torch.nn.Module) -> tuple[int, int]:
    """(decoder layers that are their own `fully_shard` unit, decoder layers) of an FSDP2
    model."""
    from torch.distributed.fsdp import FSDPModule

    # transformers names its decoder layer classes in `_no_split_modules` (on the inner model:
    # the PEFT and FSDP wrappers do not pass the attribute on).
    layer_classes = {name for module in model.modules()
                     for name in getattr(module, "_no_split_modules", None) or []}
    # fully_shard swaps a module's class for a subclass (FSDPLlamaDecoderLayer): match the MRO.
    layers = [m for m in model.modules()
              if any(cls.__name__ in layer_classes for cls in type(m).__mro__)]
    return sum(isinstance(m, FSDPModule) for m in layers), len(layers)


def describe_backend(accelerator: Accelerator, model: torch.nn.Module) -> str:
    """The line the main process prints at start-up: backend, processes, device, and how the
    weights are split (measured on this process)."""
    kind = accelerator.distributed_type.value
    version, stage = fsdp_version(accelerator), zero_stage(accelerator)
    name = f"FSDP{version}" if version else f"DeepSpeed ZeRO-{stage}" if stage is not None \
        else kind
    parts = [f"Backend: {name} ({kind}), {accelerator.num_processes} process(es) on "
             f"{accelerator.device.type}"]
    if is_fsdp2_model(model):
        sharded, layers = fsdp2_layer_units(model)
        parts.append(f"{sharded} of {layers} decoder layers sharded as their own units")
    if stage is not None and stage < 3:
        parts.append(f"optimizer state{' and gradients' if stage == 2 else ''} sharded")
    if is_fsdp2_model(model) or stage is not None:
        parts.append(f"this process holds {local_weight_fraction(model):.0%} of the weights")
    return ", ".join(parts) + "."


SYNC_REF_MODEL_UNSHARDED = ("no --sync_ref_model (its moving reference is mixed and "
                            "checkpointed whole, not sharded: use one process or the DDP "
                            "config)")


def check_backend(config: TrainConfig, state, quantize: bool) -> None:
    """Refuse, before any work and naming the fix, what this loop cannot do under FSDP or
    DeepSpeed (`state`: the AcceleratorState):

    - 4-bit weights cannot be sharded (FSDP, ZeRO-3: no bnb_4bit_quant_storage set up);
    - FSDP1 (untested, GPU-only): full fine-tuning, resumable checkpoints and generation
      (samples, the demo's evaluation) are built for FSDP2, and frozen and LoRA weights share
      its units;
    - DeepSpeed: ZeRO stages 2 and 3 are the tested ones; the engine applies each update
      inside its own step, so the loop cannot skip a non-finite one; this loop brings its own
      AdamW and learning-rate schedule; accumulation and clipping come from the flags.
    - a moving reference (--sync_ref_model) is saved and restored whole, not as shards or
      engine partitions (tested with one process and DDP).
    """
    if state.distributed_type == DistributedType.DEEPSPEED:
        _check_deepspeed(config, state.deepspeed_plugin, quantize)
    if state.distributed_type != DistributedType.FSDP:
        return
    fsdp1 = state.fsdp_plugin.fsdp_version == 1
    needs = []
    if quantize:
        needs.append("--quantization none (use the DDP config for 4-bit QLoRA)")
    if fsdp1 and config.finetuning_type == "full":
        needs.append("--finetuning_type lora (full fine-tuning is tested with FSDP2: use "
                     f"{SHIPPED_CONFIGS}/fsdp.yaml for it)")
    if fsdp1 and (config.save_steps or config.resume_from_checkpoint):
        needs.append("--save_steps 0 and no --resume_from_checkpoint (resumable checkpoints "
                     "are built for FSDP2, and the final adapter is still saved)")
    if fsdp1 and (config.num_sample_prompts or config.demo):
        needs.append("--num_sample_prompts 0 and no --demo (generation with sharded weights "
                     "is built for FSDP2)")
    if fsdp1 and not state.fsdp_plugin.use_orig_params:
        needs.append("fsdp_use_orig_params: true in the Accelerate config (frozen and LoRA "
                     "weights share FSDP units)")
    if config.sync_ref_model:
        needs.append(SYNC_REF_MODEL_UNSHARDED)
    if needs:
        raise ConfigError(f"under FSDP{state.fsdp_plugin.fsdp_version} this trainer needs "
                          + "; ".join(needs))


def _check_deepspeed(config: TrainConfig, plugin, quantize: bool) -> None:
    """`check_backend` under DeepSpeed (`plugin`: Accelerate's DeepSpeedPlugin)."""
    stage, ds_config = plugin.zero_stage, plugin.deepspeed_config
    needs = []
    if config.sync_ref_model:
        needs.append(SYNC_REF_MODEL_UNSHARDED)
    if stage not in (2, 3):
        needs.append("zero_stage: 2 or 3 in the config (the stages tested with this trainer: "
                     f"{SHIPPED_CONFIGS}/deepspeed_zero2.yaml shards what stage 1 does and "
                     "more)")
    if quantize and stage == 3:
        needs.append("--quantization none (ZeRO-3 partitions every weight and cannot "
                     f"partition 4-bit ones: use {SHIPPED_CONFIGS}/deepspeed_zero2.yaml or "
                     "ddp.yaml for QLoRA)")
    if config.skip_nonfinite_steps:
        needs.append("--skip_nonfinite_steps 0 (DeepSpeed applies each update inside its own "
                     "step, before this loop could skip it, and a non-finite step still stops "
                     "the run with the last checkpoint named)")
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            needs.append(f"no \"{section}\" section in the DeepSpeed config (this trainer "
                         "brings its own AdamW and learning-rate schedule: set them with "
                         "--learning_rate, --weight_decay, --lr_scheduler, --warmup_steps)")
    flags = {"gradient_accumulation_steps": "--gradient_accumulation_steps",
             "gradient_clipping": "--max_grad_norm"}
    for key, wanted in _deepspeed_settings(config).items():
        value = ds_config.get(key, "auto")
        if value != "auto" and float(value) != wanted:
            needs.append(f"no {key} in the Accelerate/DeepSpeed config, or the value of "
                         f"{flags[key]} (the config says {value}, {flags[key]} is "
                         f"{_plain(wanted)}, and train.py sets it from the flag)")
    if needs:
        raise ConfigError(f"under DeepSpeed ZeRO-{stage} this trainer needs "
                          + "; ".join(needs))


def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
