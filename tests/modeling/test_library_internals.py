"""The private internals of other libraries that dpo_core/modeling/library_internals.py relies on
are still there and still do what it needs: when an upgrade changes them, these fail, naming
what moved, instead of a multi-process run failing obscurely (or training unsharded)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from conftest import ROOT
from launching import free_port

from dpo_core.modeling import library_internals
from dpo_core.modeling.backends import is_fsdp2_model
from dpo_core.testing import tiny_llama


@pytest.fixture()
def one_process_gloo_group(monkeypatch):
    """The variables a launcher sets for a process group of one process, on the CPU."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "2",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_switch_to_fsdp2_makes_accelerate_shard_on_the_cpu(one_process_gloo_group, monkeypatch):
    """What fsdp.yaml exports, on a MULTI_CPU (gloo) state: after the switch both of
    Accelerate's state singletons say FSDP (a fresh instance reads the shared state), and
    `prepare` shards the model with FSDP2's `fully_shard`."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU  # what Accelerate does
    library_internals.switch_to_fsdp2(accelerator)
    assert AcceleratorState().distributed_type == DistributedType.FSDP, "AcceleratorState"
    assert PartialState().distributed_type == DistributedType.FSDP, "PartialState"
    assert AcceleratorState().fsdp_plugin.fsdp_version == 2
    model = tiny_llama(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    assert is_fsdp2_model(model)


def test_deepspeed_builds_no_shared_memory_kernel_once_told(monkeypatch):
    """DeepSpeed's table of buildable ops still names the CPU shared-memory kernel, and the
    function its CPU backend calls at start-up builds nothing once it is marked unavailable."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e .[deepspeed])")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder.NAME == library_internals.DEEPSPEED_SHARED_MEMORY_KERNEL
    table = deepspeed.ops.__compatible_ops__
    assert library_internals.DEEPSPEED_SHARED_MEMORY_KERNEL in table
    monkeypatch.setitem(table, library_internals.DEEPSPEED_SHARED_MEMORY_KERNEL, True)
    library_internals.skip_deepspeed_shared_memory_kernel()
    assert table[library_internals.DEEPSPEED_SHARED_MEMORY_KERNEL] is False
    assert build_shm_op() is None


def test_every_private_access_lives_in_the_one_module():
    """Outside library_internals no dpo_core module writes Accelerate's state singletons or
    transformers' FSDP flag, or reads DeepSpeed's op table."""
    private = re.compile(r"\.distributed_type\s*=[^=]|_is_fsdp_managed_module|"
                         r"__compatible_ops__|_shared_state")
    offenders = [f"{path.relative_to(ROOT)}: {found}"
                 for path in pathlib.Path(ROOT, "dpo_core").rglob("*.py")
                 if path.name != "library_internals.py"
                 for found in private.findall(path.read_text())]
    assert not offenders, offenders
