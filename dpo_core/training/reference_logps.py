"""Reference log-probs computed once before training and cached on disk.

The reference model (the policy with its adapter switched off, a frozen copy of the SFT adapter
it started from, or the full model before training) never changes, so its
log-probs of every pair can be computed in one no-grad pass (larger batches, pairs sorted by
length so batches carry little padding) and reused by every epoch and every evaluation. The
values are cached in a safetensors file named after a key that covers everything they depend
on: the model's configuration, a fingerprint of its weights other than the trained adapter's
(the starting adapter's frozen copy included), the token ids of the pairs and the log-prob
settings. A restart or a second run on the same model and data loads
them; any change gives another key and a fresh pass. An unreadable or mismatched file is
recomputed and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpo_core.console import logger
from dpo_core.data.batches import PreferenceCollator, length_sorted_order, pair_lengths
from dpo_core.data.token_store import digest_of
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.forward.logps import LogpsFn
from dpo_core.modeling.adapters import POLICY_ADAPTER
from dpo_core.modeling.loading import base_model_of, eval_mode
from dpo_core.modeling.reference import ReferenceContext, policy_itself
from dpo_core.training.objective import PreferenceObjective

CACHE_FORMAT = 2

# Elements hashed per weight tensor (evenly spaced), plus the tensor's exact fp64 sum: cheap
# even for billions of weights, and any real change of a checkpoint moves both.
FINGERPRINT_SAMPLES = 4096

# Config entries that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "use_cache")


@dataclass(frozen=True)
class PairWithReference(TokenizedPair):
    """A tokenized pair with the reference model's log-probs of its two responses (fp32 values)."""

    reference_chosen_logps: float
    reference_rejected_logps: float


class ReferenceLogpsCollator:
    """A `PreferenceCollator` that also returns `reference_chosen_logps` and
    `reference_rejected_logps` ([B] fp32), which `PreferenceObjective` then uses as they are."""

    def __init__(self, collator: PreferenceCollator):
        self.collator = collator

    def __call__(self, pairs: Sequence[PairWithReference]) -> dict[str, torch.Tensor]:
        if not all(isinstance(pair, PairWithReference) for pair in pairs):
            raise TypeError("ReferenceLogpsCollator needs PairWithReference items")
        batch = self.collator(pairs)
        for field in ("reference_chosen_logps", "reference_rejected_logps"):
            batch[field] = torch.tensor([getattr(p, field) for p in pairs], dtype=torch.float32)
        return batch


class PairsWithReference(Sequence[PairWithReference]):
    """Pairs and their reference log-probs ([N, 2] fp32: chosen, rejected), joined per item:
    the pairs stay as compact as they were."""

    def __init__(self, pairs: Sequence[TokenizedPair], values: torch.Tensor):
        self.pairs, self.values = pairs, values.numpy()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int | slice) -> PairWithReference | list[PairWithReference]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        pair, (chosen, rejected) = self.pairs[index], self.values[index].tolist()
        return PairWithReference(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids,
                                 chosen, rejected)


@dataclass(frozen=True)
class ReferencePass:
    """What `with_reference_logps` did: the pairs with their values, the cache file, whether
    the values came from it, and the seconds spent (hashing, loading or computing)."""

    pairs: Sequence[PairWithReference]
    cache_path: str | None
    from_cache: bool
    seconds: float


def is_policy_adapter_weight(name: str) -> bool:
    """A weight of the LoRA adapter that trains (`...lora_A.default.weight`, ...)."""
    parts = name.split(".")
    return POLICY_ADAPTER in parts and any(part.startswith("lora_") for part in parts)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer but the trained adapter's: name, shape, dtype, an
    evenly spaced sample of its values and its fp64 sum. The trained adapter is left out: the
    reference never runs it, whatever it holds. A frozen reference adapter (DPO started from an
    SFT adapter) is in: other starting adapters give other reference log-probs."""
    digest = hashlib.sha256()
    base = base_model_of(model)
    tensors = list(base.named_parameters()) + list(base.named_buffers())
    for name, tensor in tensors:
        if is_policy_adapter_weight(name):
            continue
        if isinstance(tensor, DTensor):  # FSDP2: every process gathers the same whole weight
            tensor = tensor.full_tensor()
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        total = torch.sum(flat, dtype=torch.float64).item() if flat.numel() else 0.0
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
        # A copy: `.numpy()` marks the storage it shares as not resizable, and FSDP2 frees
        # the storage of the whole weights it gathered (the root's stay gathered after a
        # forward) by resizing it.
        digest.update(sample.cpu().contiguous().clone().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_cache_key(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], settings: Mapping[str, object],
    weights: str | None = None,
) -> str:
    """Hex key of the cache entry for `pairs` under `model` and the log-prob `settings`.
    `weights`: `weights_fingerprint(model)` when already computed."""
    config = base_model_of(model).config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    parts = {
        "format": CACHE_FORMAT,
        "config": config,
        "weights": weights or weights_fingerprint(model),
        "data": digest_of(pairs),
        "settings": dict(settings),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    logps: LogpsFn,
    collator: PreferenceCollator,
    accelerator: Accelerator,
    batch_size: int,
    show_progress: bool = False,
) -> torch.Tensor:
    """(chosen, rejected) log-probs of every pair by `logps(model, batch)` (the reference pass:
    `PreferenceObjective.reference_logps` with the run's reference) -> [N, 2] fp32 on the CPU.

    Processes share the batches and gather the results; pairs go longest first so each batch
    pads little. The model runs in eval mode (no dropout) and returns to its previous mode.
    """
    order = length_sorted_order(pair_lengths(pairs, prefix_sharing=True))

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collator([pairs[i] for i in indices])
        batch["pair_index"] = torch.tensor(indices, dtype=torch.long)
        return batch

    # Its own generator: a DataLoader otherwise draws a seed from the global RNG, and a run
    # that finds the values cached would then continue with other dropout masks.
    loader = accelerator.prepare_data_loader(
        DataLoader(order, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
    )
    values = torch.empty(len(pairs), 2, dtype=torch.float32)
    with eval_mode(model):
        for batch in tqdm(loader, desc="Reference log-probs", unit="batch",
                          disable=not (show_progress and accelerator.is_main_process)):
            chosen, rejected = logps(model, batch)
            # Duplicates that even out the last batches across processes carry the same
            # index and the same values, so writing them twice is harmless.
            gathered = accelerator.gather(
                {"index": batch["pair_index"], "logps": torch.stack([chosen, rejected], dim=1)}
            )
            values[gathered["index"].cpu()] = gathered["logps"].float().cpu()
    return values


def _load_cached(path: str, key: str, num_pairs: int) -> torch.Tensor | None:
    """The cached [N, 2] values, or None when the file is missing, unreadable or for another key."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as cached:
            metadata = cached.metadata() or {}
            values = cached.get_tensor("reference_logps")
    except Exception as error:  # any unreadable file is simply recomputed
        logger.info(f"Reference log-prob cache {path} is unreadable ({type(error).__name__}); "
                    "recomputing it.")
        return None
    if metadata.get("key") != key or tuple(values.shape) != (num_pairs, 2):
        logger.info(f"Reference log-prob cache {path} belongs to other data or weights; "
                    "recomputing it.")
        return None
    return values


def _save(path: str, key: str, values: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    save_file({"reference_logps": values.contiguous()}, partial, metadata={"key": key})
    os.replace(partial, path)  # atomic: a crash never leaves a half-written cache behind


def with_reference_logps(
    pairs: Sequence[TokenizedPair],
    *,
    model: torch.nn.Module,
    objective: PreferenceObjective,
    reference: ReferenceContext | None = None,
    collator: PreferenceCollator,
    accelerator: Accelerator,
    batch_size: int,
    cache_dir: str,
    settings: Mapping[str, object],
    show_progress: bool = True,
    weights: str | None = None,
) -> ReferencePass:
    """`pairs` with their reference log-probs, from `cache_dir` when cached, else computed
    (every process takes part) and cached by the main process.

    `settings`: whatever else changes the values (log-prob function, dtype, ...), part of the key;
    `weights`: `weights_fingerprint(model)` when already computed (it reads every weight).
    """
    if not objective.uses_reference:
        raise ValueError(f"loss {objective.loss_type!r} without a reference has no reference "
                         "log-probs to precompute")
    started = time.perf_counter()
    if not pairs:
        return ReferencePass([], None, False, 0.0)
    key = reference_cache_key(model, pairs, settings, weights)
    path = os.path.join(cache_dir, f"reference_logps-{key[:16]}.safetensors")
    # The main process decides for everyone, so no process skips a pass the others run.
    cached = [_load_cached(path, key, len(pairs)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(cached)
    values = cached[0]
    from_cache = values is not None
    if values is None:
        values = compute_reference_logps(
            model, pairs, logps=functools.partial(objective.reference_logps, reference=reference),
            collator=collator, accelerator=accelerator, batch_size=batch_size,
            show_progress=show_progress)
        if accelerator.is_main_process:
            _save(path, key, values)
    accelerator.wait_for_everyone()
    joined = PairsWithReference(pairs, values)
    seconds = time.perf_counter() - started
    if show_progress and accelerator.is_main_process:
        how = "loaded from" if from_cache else f"computed in {seconds:.1f} s and cached to"
        logger.info(f"Reference log-probs of {len(pairs)} pairs {how} {path}.")
    return ReferencePass(joined, path, from_cache, seconds)


def precompute_reference(config, splits: Sequence[Sequence[TokenizedPair]], *,
                         model: torch.nn.Module, objective: PreferenceObjective,
                         reference: ReferenceContext, forward: dict,
                         collator: PreferenceCollator, accelerator: Accelerator,
                         batch_size: int, dtype: torch.dtype,
                         quantize: bool) -> list[ReferencePass]:
    """`with_reference_logps` for each of a run's `splits` (train, eval), cached under
    --ref_cache_dir (default output_dir/reference_logps) and keyed also by what else changes
    the values: the forward path and its attention (`forward`: `Forward.record()`), dtype,
    4-bit, --ld_alpha. `config`: the run's TrainConfig; `reference`: the run's reference
    network."""
    # Full fine-tuning: the policy before its first step (and before a resumed checkpoint is
    # loaded) is the reference.
    if config.finetuning_type == "full":
        reference = policy_itself
    # Since the masks of shared and packed rows follow the model's own mask functions
    # ("layout masks"), a windowed model's values differ from earlier caches'.
    settings = {**forward, "layout_masks": "model mask functions", "dtype": str(dtype),
                "quantize": quantize, "ld_alpha": config.ld_alpha}
    cache_dir = config.ref_cache_dir or os.path.join(config.output_dir, "reference_logps")
    # One fingerprint for every split: it reads (under FSDP2 gathers) every weight.
    weights = weights_fingerprint(model) if any(splits) else None
    return [with_reference_logps(pairs, model=model, objective=objective, reference=reference,
                                 collator=collator, accelerator=accelerator,
                                 batch_size=batch_size, cache_dir=cache_dir, settings=settings,
                                 show_progress=accelerator.is_main_process, weights=weights)
            for pairs in splits]
