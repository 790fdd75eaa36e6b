"""Every use of another library's private internals, in one place.

Each is here because no public route does the job; the versions they were checked against are
pinned in setup.cfg, and tests/modeling/test_library_internals.py fails, naming the attribute,
when a library changes what is relied on here.

- FSDP2 on a machine without GPUs. `accelerate launch --config_file fsdp.yaml` exports the
  FSDP settings, but Accelerate's `AcceleratorState` applies an FSDP plugin only to GPU-like
  backends and otherwise runs plain MULTI_CPU data parallelism, although FSDP2's `fully_shard`
  works over gloo. `switch_to_fsdp2` does what Accelerate's own switch does on GPUs: it sets
  the plugin and writes the backend into the two state singletons (`AcceleratorState` and
  `PartialState` keep separate shared dicts; gather and reduce read the latter).
- DeepSpeed on a machine without GPUs. DeepSpeed's CPU communication backend compiles a
  shared-memory all-reduce kernel (a C++ build of about a minute, needing a compiler) the first
  time it starts. Only tensor-parallel inference uses it; training's collectives go through
  gloo either way. `skip_deepspeed_shared_memory_kernel` marks the kernel unavailable in
  DeepSpeed's table of buildable ops, so a run starts at once.

(DeepSpeed itself needs no help: `Accelerator(kwargs_handlers=[InitProcessGroupKwargs(
backend="gloo")])` starts it over gloo through Accelerate's public arguments.)
"""

from __future__ import annotations

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

# The name DeepSpeed's op builder gives the CPU shared-memory all-reduce kernel.
DEEPSPEED_SHARED_MEMORY_KERNEL = "deepspeed_shm_comm"


def switch_to_fsdp2(accelerator: Accelerator) -> None:
    """Turn a MULTI_CPU (gloo) state into FSDP2 with the plugin read from the launcher's
    FSDP_* variables. FSDP1 needs a device per process and is left as it is (the caller stops
    with the reason)."""
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2 or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def skip_deepspeed_shared_memory_kernel() -> None:
    """Before DeepSpeed starts its communication backend on the CPU: do not build the
    shared-memory kernel (see the module docstring)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DEEPSPEED_SHARED_MEMORY_KERNEL] = False
