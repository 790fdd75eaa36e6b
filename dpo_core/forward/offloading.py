"""Activation offloading (`--activation_offloading`, trl's name): the tensors the policy forward
saves for its backward pass wait in host memory instead of on the accelerator.

`ActivationOffload(model)` is a `torch.autograd.graph.saved_tensors_hooks` context: inside it,
each tensor autograd saves is copied to (pinned) host memory as it is saved, and copied back to
its device when the backward pass asks for it. The device keeps only the activations of the
layer running now, the host holds the rest: peak accelerator memory falls by about the saved
activations, for two host-device copies of each (benchmarks/RESULTS.md; not measured on a
GPU here). Left where they are: the model's own weights (they stay on the device anyway),
tensors smaller than `MIN_OFFLOAD_BYTES` (not worth a copy) and tensors already in host memory
(`STAYS`: on a CPU-only run nothing moves). A tensor saved several times during one forward
(the input of q, k and v) is copied once.

Values and gradients are exactly those without offloading (a copy changes no bit). With
gradient checkpointing the checkpointed decoder layers save nothing through these hooks (they
recompute in the backward pass), so only what runs outside them moves: little is left to gain.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# Smaller saved tensors stay on the device: their copies would cost more than they free.
MIN_OFFLOAD_BYTES = 1024
# Device types whose tensors already live in host memory.
STAYS = ("cpu",)


def _storage_pointer(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. a sharded DTensor: no local storage
        return None


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """`with ActivationOffload(model):` around a forward pass; its backward may run later,
    outside the context. `offloaded_bytes` counts what went to host memory."""

    def __init__(self, model: torch.nn.Module, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.weights = {_storage_pointer(t) for t in (*model.parameters(), *model.buffers())}
        self.min_bytes = min_bytes
        self.offloaded_bytes = 0
        # id(saved tensor) -> (weak reference to it, its host copy), during the forward only.
        self._copies: dict[int, tuple[weakref.ref, Tensor]] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> ActivationOffload:
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._copies.clear()  # the graph holds the copies now; a later tensor may reuse an id
        super().__exit__(*exc)

    def _pack(self, tensor: Tensor) -> Tensor | tuple[torch.device, Tensor]:
        if (tensor.device.type in STAYS or tensor.nbytes < self.min_bytes
                or _storage_pointer(tensor) in self.weights):
            return tensor
        known = self._copies.get(id(tensor))
        if known is not None and known[0]() is tensor:
            return tensor.device, known[1]
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                           pin_memory=tensor.device.type == "cuda")
        # Non-blocking into pinned memory: the copy back runs later on the same stream, so it
        # is ordered after this one, and the caching allocator reuses the device memory only
        # for work queued after it.
        host.copy_(tensor, non_blocking=True)
        self._copies[id(tensor)] = (weakref.ref(tensor), host)
        self.offloaded_bytes += tensor.nbytes
        return tensor.device, host

    @staticmethod
    def _unpack(packed: Tensor | tuple[torch.device, Tensor]) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)
