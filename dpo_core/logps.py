"""Sequence log-probabilities of preference pairs under a causal LM.

Entry points, all returning fp32 sums of response-token log-probs:

- `sequence_logps(logits, labels)`: from logits you already have.
- `concatenated_forward(model, batch)`: chosen and rejected stacked into one forward of 2B rows.
- `prefix_shared_forward(model, batch)`: one row per pair, `[prompt | chosen | rejected]`, with a
  4D attention mask so the prompt is encoded once (arXiv 2410.20305). Same numbers, fewer tokens.
- `padding_free_forward`, `padding_free_prefix_shared_forward`: the whole micro-batch as one
  row of real tokens (`dpo_core/packing.py`). Same numbers, no padding.

Memory: no `[tokens, vocab]` logits tensor is ever built. The model's own head projects no
position (`logits_to_keep` as an empty index, which every transformers 5 takes); the decoder's
hidden states at label-predicting positions are gathered and `head_label_logps` projects them a
chunk at a time, each label's log-prob its logit minus a logsumexp in fp32, with a custom
backward (frozen linear head) or per-chunk recomputation (any other head). Models whose logits
are post-processed (soft-capping, scaling) are asked for their full logits instead, a trainable
head sharded by FSDP2 projects the needed positions inside the model's forward, and
`sequence_logps` works on given logits with the same chunking.

`model` may be a Hugging Face causal LM, a PEFT model, or an Accelerate/DDP wrapper of either:
it is always called at the top level so DDP hooks, autocast wrappers and
`peft_model.disable_adapter()` apply.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from dpo_core.console import logger
from dpo_core.distributed import is_fsdp2_model
from dpo_core.model import base_model_of
from dpo_core.packing import (
    PACKED_ATTENTION,
    PackedRow,
    pack_prefix_shared,
    pack_sequences,
    use_packed_attention,
)
from dpo_core.tokenization import IGNORE_INDEX

# fp32 elements per chunk of the logsumexp (16 MiB): large enough to keep the kernels efficient,
# small enough that the per-chunk upcast is negligible next to the logits themselves.
CHUNK_ELEMENTS = 1 << 22

# Attention implementations that take a ready-made 4D mask unchanged.
FOUR_D_MASK_ATTENTION = ("eager", "sdpa", PACKED_ATTENTION)
# Config entries of models whose logits are not just the LM head's output (Gemma 2/3 soft-cap,
# Cohere's scale, Granite's divisor): their log-probs come from the model's full logits.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")

PAIR_FIELDS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_attention_mask",
    "rejected_labels",
)

# (model, batch) -> (chosen_logps [B], rejected_logps [B]), fp32 sums over response tokens.
LogpsFn = Callable[[torch.nn.Module, dict], tuple[Tensor, Tensor]]


class _LabelLogProbs(torch.autograd.Function):
    """log p(target) for rows of a logits matrix, chunked over rows.

    forward(logits [M, V] any float dtype, rows [N] long, targets [N] long) -> [N] fp32,
    out[i] = log_softmax(logits[rows[i]])[targets[i]]. Rows may repeat (prefix sharing predicts
    the first chosen and the first rejected token from the same position).
    Peak extra memory: one fp32 chunk [rows_per_chunk, V], forward and backward (the gradient
    itself is [M, V] in the logits dtype, as autograd requires).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
        token_logps = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
        logsumexps = torch.empty_like(token_logps)
        for chunk in _chunks(targets.shape[0], logits.shape[-1]):
            chunk_logits = logits.index_select(0, rows[chunk]).float()
            logsumexps[chunk] = torch.logsumexp(chunk_logits, dim=-1)
            picked = chunk_logits.gather(1, targets[chunk, None]).squeeze(1)
            token_logps[chunk] = picked - logsumexps[chunk]
        ctx.save_for_backward(logits, rows, targets, logsumexps)
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps: Tensor) -> tuple[Tensor, None, None]:
        logits, rows, targets, logsumexps = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for chunk in _chunks(targets.shape[0], logits.shape[-1]):
            grad = grad_token_logps[chunk, None].float()
            # d/dlogits of (logit[target] - logsumexp) = onehot(target) - softmax.
            chunk_grad = logits.index_select(0, rows[chunk]).float() - logsumexps[chunk, None]
            chunk_grad.exp_().mul_(-grad)
            chunk_grad.scatter_add_(1, targets[chunk, None], grad)
            grad_logits.index_add_(0, rows[chunk], chunk_grad.to(logits.dtype))
        return grad_logits, None, None


def _chunks(num_rows: int, vocab_size: int) -> list[slice]:
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + rows_per_chunk) for start in range(0, num_rows, rows_per_chunk)]


class _FrozenHeadLabelLogProbs(torch.autograd.Function):
    """log p(target) through a frozen linear LM head, chunked over predictions.

    forward(hidden [M, H], rows [N] long, targets [N] long, weight [V, H], bias [V] or None)
    -> [N] fp32, out[i] = log_softmax(hidden[rows[i]] @ weight.T + bias)[targets[i]].
    The head is frozen, so the only gradient is the one to `hidden`, and it is linear in the
    upstream gradient: d out[i] / d hidden[rows[i]] = weight[targets[i]] - softmax_i @ weight.
    Forward computes that [N, H] Jacobian chunk by chunk (the matmul a backward would do), so
    backward is a scaled index_add and the logits are never recomputed.
    Peak extra memory: one fp32 [rows_per_chunk, V] chunk, plus the [N, H] Jacobian.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, rows: Tensor, targets: Tensor, weight: Tensor,
                bias: Tensor | None) -> Tensor:
        needs_grad = ctx.needs_input_grad[0]
        token_logps = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
        jacobian = (torch.empty(targets.shape[0], hidden.shape[-1], dtype=hidden.dtype,
                                device=hidden.device) if needs_grad else None)
        for chunk in _chunks(targets.shape[0], weight.shape[0]):
            # One fused log_softmax (fp32), read for the label and exponentiated in place for
            # the softmax: fewer passes over the [chunk, V] block than logsumexp, sub and exp.
            chunk_logps = torch.log_softmax(
                F.linear(hidden.index_select(0, rows[chunk]), weight, bias).float(), dim=-1)
            token_logps[chunk] = chunk_logps.gather(1, targets[chunk, None]).squeeze(1)
            if needs_grad:
                probs = chunk_logps.exp_()
                expected = probs.to(weight.dtype) @ weight  # [chunk, H]: E_softmax[weight row]
                jacobian[chunk] = (weight[targets[chunk]] - expected).to(hidden.dtype)
        ctx.save_for_backward(rows, jacobian)
        ctx.num_hidden = hidden.shape[0]
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps: Tensor) -> tuple[Tensor, None, None, None, None]:
        rows, jacobian = ctx.saved_tensors
        grad_hidden = torch.zeros(ctx.num_hidden, jacobian.shape[-1], dtype=jacobian.dtype,
                                  device=jacobian.device)
        scaled = jacobian * grad_token_logps[:, None].to(jacobian.dtype)
        return grad_hidden.index_add_(0, rows, scaled), None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def head_label_logps(head: torch.nn.Module, hidden: Tensor, rows: Tensor,
                     targets: Tensor) -> Tensor:
    """log_softmax(head(hidden[rows[i]]))[targets[i]] -> [N] fp32, chunk by chunk.

    hidden [M, H]; rows, targets [N]. A frozen `nn.Linear` head (LoRA's default: the head is
    not a target) goes through `_FrozenHeadLabelLogProbs`. Any other head (trainable, an
    adapter on it, `modules_to_save`, quantized) is called as the module it is, one chunk at
    a time under activation checkpointing, so backward recomputes one chunk's logits at a
    time instead of keeping all of them.
    """
    targets = targets.long()
    if _frozen_linear(head):
        return _FrozenHeadLabelLogProbs.apply(hidden, rows, targets, head.weight, head.bias)

    def chunk_logps(chunk_hidden: Tensor, chunk_targets: Tensor) -> Tensor:
        chunk_logps = torch.log_softmax(head(chunk_hidden).float(), dim=-1)
        return chunk_logps.gather(1, chunk_targets[:, None]).squeeze(1)

    vocab_size = getattr(head, "out_features", None) or head.weight.shape[0]
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = [torch.zeros(0, dtype=torch.float32, device=hidden.device)]
    for chunk in _chunks(targets.shape[0], vocab_size):
        chunk_hidden = hidden.index_select(0, rows[chunk])
        parts.append(checkpoint(chunk_logps, chunk_hidden, targets[chunk], use_reentrant=False)
                     if needs_grad else chunk_logps(chunk_hidden, targets[chunk]))
    return torch.cat(parts)


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of label-token log-probs per sequence, fp32.

    logits [B, T, V] (any float dtype), labels [B, T] aligned with the input ids (this function
    shifts: logits[:, t] predicts labels[:, t + 1]); IGNORE_INDEX (-100) labels are skipped.
    Returns [B] fp32. No fp32 copy of the full [B, T, V] logits or log-softmax is made.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_logps: logits must be [B, T, V] and labels [B, T]; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    batch_size, seq_len, vocab_size = logits.shape
    seq_index, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    token_logps = _LabelLogProbs.apply(logits.reshape(batch_size * seq_len, vocab_size),
                                       seq_index * seq_len + positions,
                                       labels[seq_index, positions + 1].long())
    return _per_sequence(token_logps, seq_index, batch_size)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, LM head) of a causal LM whose logits are just `lm_head(decoder(...)[0])`, or
    None: models without `logits_to_keep`, without a separate decoder, or that post-process
    their logits (LOGIT_POSTPROCESSING) take the full-logits path."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters or any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING
    ):
        return None
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None
    decoder, head = get_decoder(), get_head()
    if not isinstance(head, torch.nn.Module) or decoder is base or decoder is None:
        return None
    return decoder, head


def _hidden_states(model: torch.nn.Module, decoder: torch.nn.Module, inputs: dict) -> Tensor:
    """The decoder's last hidden states [R, L, H] from one top-level forward (so DDP hooks,
    autocast wrappers and `disable_adapter()` apply). The model's own head projects no
    position at all: `logits_to_keep` as an empty 1D index tensor, which every transformers 5
    takes (the 2D boolean mask only exists from 5.21 on)."""
    captured = []
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    nothing = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        model(**inputs, logits_to_keep=nothing)
    finally:
        hook.remove()
    return captured[-1]


def _predicted_logps(
    model: torch.nn.Module,
    inputs: dict,
    source_rows: Tensor,
    source_positions: Tensor,
    targets: Tensor,
    kept: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One forward over `inputs` (input_ids [R, L], masks, position ids, ...) -> [N] fp32:
    log p(targets[i]) under the prediction at (source_rows[i], source_positions[i]).

    The LM head only ever sees the hidden states of those positions, projected chunk by chunk
    by `head_label_logps`: no [tokens, vocab] logits tensor exists. Models that post-process
    their logits are asked for full logits instead, and a trainable head under FSDP2 for the
    logits of the needed positions only. `kept` = (kept_positions [M], kept_index
    [N]): the distinct predicting positions (flat, row-major over [R, L]) and which of them
    predicts target i, when computed beforehand (on the CPU, by the collator): then nothing
    here waits for the device.
    """
    shape = inputs["input_ids"].shape
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(**inputs).logits  # [R, L, V]
        rows = source_rows * shape[1] + source_positions
    elif is_fsdp2_model(model) and any(p.requires_grad for p in parts[1].parameters()):
        # FSDP2 gathers and frees the root unit's weights (the head's among them) around the
        # root's own forward and backward; a trainable head called outside it crashed (SIGSEGV,
        # CPU, full fine-tuning). So the model projects the positions any target needs itself:
        # `logits_to_keep` as their column index.
        columns, column_of = torch.unique(source_positions, return_inverse=True)
        logits = model(**inputs, logits_to_keep=columns).logits  # [R, C, V]
        rows = source_rows * columns.numel() + column_of
    else:
        return _hand_projected_logps(model, *parts, inputs, source_rows, source_positions,
                                     targets, kept)
    return _LabelLogProbs.apply(logits.reshape(-1, logits.shape[-1]), rows, targets.long())


def _hand_projected_logps(model: torch.nn.Module, decoder: torch.nn.Module,
                          head: torch.nn.Module, inputs: dict, source_rows: Tensor,
                          source_positions: Tensor, targets: Tensor,
                          kept: tuple[Tensor, Tensor] | None) -> Tensor:
    """`_predicted_logps` through the decoder's hidden states at the kept positions and the
    head applied to them by `head_label_logps`."""
    shape = inputs["input_ids"].shape
    if kept is None:  # the distinct predicting positions, flat and sorted, and which is whose
        kept = torch.unique(source_rows * shape[1] + source_positions, return_inverse=True)
    hidden = _hidden_states(model, decoder, inputs)
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept[0])  # [M, H]
    return head_label_logps(head, kept_hidden, kept[1], targets)


def _check_pair_batch(batch: dict[str, Tensor], fields: tuple[str, ...]) -> None:
    missing = [field for field in fields if field not in batch]
    if missing:
        raise KeyError(f"preference batch is missing field(s) {missing}; it has {sorted(batch)}")
    shape = batch["chosen_input_ids"].shape
    wrong = {f: tuple(batch[f].shape) for f in PAIR_FIELDS if batch[f].shape != shape}
    if len(shape) != 2 or wrong:
        raise ValueError(
            f"preference batch fields must all be [B, T] with one T; chosen_input_ids is "
            f"{tuple(shape)}, mismatched: {wrong}"
        )
    if "prompt_lengths" in fields and batch["prompt_lengths"].shape != shape[:1]:
        raise ValueError(
            f"preference batch field prompt_lengths must be [B] = {tuple(shape[:1])}, got "
            f"{tuple(batch['prompt_lengths'].shape)}"
        )


def concatenated_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Chosen and rejected in ONE forward of 2B rows -> (chosen_logps [B], rejected_logps [B]) fp32.

    Position ids come from the attention mask (cumsum - 1), so left and right padding give the
    same numbers, and each row is independent of the others in the batch.
    """
    _check_pair_batch(batch, PAIR_FIELDS)
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)

    # Positions whose next token is a label. A real token must predict it: with an empty prompt
    # the first response token follows left padding (or nothing), and is not scored.
    scored = (labels[:, 1:] != IGNORE_INDEX) & attention_mask[:, :-1].bool()
    seq_index, positions = scored.nonzero(as_tuple=True)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=False)
    # Each position predicts one label, and nonzero lists them in row-major order: they are
    # already the distinct, sorted kept positions.
    kept = (seq_index * input_ids.shape[1] + positions,
            torch.arange(len(seq_index), device=seq_index.device))
    token_logps = _predicted_logps(model, inputs, seq_index, positions,
                                   labels[seq_index, positions + 1], kept)
    logps = _per_sequence(token_logps, seq_index, labels.shape[0])
    num_pairs = batch["chosen_input_ids"].shape[0]
    return logps[:num_pairs], logps[num_pairs:]


def _per_sequence(token_logps: Tensor, sequence_index: Tensor, num_sequences: int) -> Tensor:
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, sequence_index, token_logps)


@dataclass
class PrefixSharedRows:
    """One right-padded row per pair: `[prompt | chosen response | rejected response | pad]`.

    input_ids, position_ids, segment_ids: [B, L]; segment ids are PROMPT, CHOSEN, REJECTED or PAD.
    Predictions (one per label token): the logits at row position `source_positions[i]` of row
    `source_rows[i]` predict `targets[i]`, which belongs to sequence `sequence_index[i]`
    (b for the chosen response of pair b, B + b for its rejected response).
    """

    PROMPT = 0
    CHOSEN = 1
    REJECTED = 2
    PAD = -1

    input_ids: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    source_rows: Tensor
    source_positions: Tensor
    targets: Tensor
    sequence_index: Tensor

    def attention_mask(self, attn_implementation: str) -> Tensor:
        """[B, 1, L, L] mask: bool (True = attend) for sdpa, additive fp32 for eager.

        Causal; prompt tokens see the prompt, chosen tokens the prompt and chosen, rejected
        tokens the prompt and rejected (never chosen). Padding sits at the end of each row, so
        causality hides it from real tokens; every query sees itself, so no softmax row is empty.
        """
        seq_len = self.segment_ids.shape[1]
        query = self.segment_ids[:, :, None]
        key = self.segment_ids[:, None, :]
        position = torch.arange(seq_len, device=self.segment_ids.device)
        causal = position[:, None] >= position[None, :]
        visible = (causal & ((key == self.PROMPT) | (key == query)))[:, None]
        if attn_implementation != "eager":
            return visible
        # eager adds the mask to the scores; fp32 promotes bf16/fp16 scores before its fp32 softmax.
        additive = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
        return additive.masked_fill_(~visible, torch.finfo(torch.float32).min)


def prefix_shared_batch(batch: dict[str, Tensor]) -> PrefixSharedRows:
    """Rebuild a standard pair batch (either padding side) as prefix-shared rows.

    Needs `prompt_lengths` [B]: the number of prompt tokens at the start of each unpadded
    sequence; the first prompt_lengths[b] tokens of chosen and rejected must be identical.
    """
    _check_pair_batch(batch, (*PAIR_FIELDS, "prompt_lengths"))
    device = batch["chosen_input_ids"].device
    rows, positions, segments = [], [], []
    source_rows, source_positions, targets, sequence_index = [], [], [], []
    num_pairs = batch["chosen_input_ids"].shape[0]
    for b in range(num_pairs):
        chosen_mask = batch["chosen_attention_mask"][b].bool()
        rejected_mask = batch["rejected_attention_mask"][b].bool()
        chosen_ids = batch["chosen_input_ids"][b][chosen_mask]
        rejected_ids = batch["rejected_input_ids"][b][rejected_mask]
        chosen_labels = batch["chosen_labels"][b][chosen_mask]
        rejected_labels = batch["rejected_labels"][b][rejected_mask]
        prompt_len = int(batch["prompt_lengths"][b])
        if not (
            0 <= prompt_len <= min(len(chosen_ids), len(rejected_ids))
            and torch.equal(chosen_ids[:prompt_len], rejected_ids[:prompt_len])
        ):
            raise ValueError(
                f"prefix sharing: pair {b} of the batch: the first prompt_lengths={prompt_len} "
                f"tokens of chosen ({len(chosen_ids)} tokens) and rejected ({len(rejected_ids)} "
                "tokens) must be one identical prompt"
            )
        chosen_len, rejected_len = len(chosen_ids), len(rejected_ids)
        rows.append(torch.cat([chosen_ids, rejected_ids[prompt_len:]]))
        arange = torch.arange(max(chosen_len, rejected_len), device=device)
        positions.append(torch.cat([arange[:chosen_len], arange[prompt_len:rejected_len]]))
        segments.append(
            torch.repeat_interleave(
                torch.tensor(
                    [PrefixSharedRows.PROMPT, PrefixSharedRows.CHOSEN, PrefixSharedRows.REJECTED],
                    device=device,
                ),
                torch.tensor(
                    [prompt_len, chosen_len - prompt_len, rejected_len - prompt_len], device=device
                ),
            )
        )
        # Chosen keeps its own coordinates; rejected position j >= prompt_len moves right by the
        # chosen response length, and its prompt positions are the shared ones.
        chosen_targets = (chosen_labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1
        rejected_targets = (rejected_labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1
        rejected_sources = rejected_targets - 1
        shift = chosen_len - prompt_len
        rejected_sources = torch.where(
            rejected_sources >= prompt_len, rejected_sources + shift, rejected_sources
        )
        for sources, target_ids, sequence in (
            (chosen_targets - 1, chosen_labels[chosen_targets], b),
            (rejected_sources, rejected_labels[rejected_targets], num_pairs + b),
        ):
            source_rows.append(torch.full_like(sources, b))
            source_positions.append(sources)
            targets.append(target_ids)
            sequence_index.append(torch.full_like(sources, sequence))

    row_len = max(len(row) for row in rows)

    def right_padded(parts: list[Tensor], value: int) -> Tensor:
        padded = torch.full((num_pairs, row_len), value, dtype=torch.long, device=device)
        for b, part in enumerate(parts):
            padded[b, : len(part)] = part
        return padded

    return PrefixSharedRows(
        input_ids=right_padded(rows, 0),  # any pad id: padding comes after every real token
        position_ids=right_padded(positions, 0),
        segment_ids=right_padded(segments, PrefixSharedRows.PAD),
        source_rows=torch.cat(source_rows),
        source_positions=torch.cat(source_positions),
        targets=torch.cat(targets),
        sequence_index=torch.cat(sequence_index),
    )


def prefix_shared_forward(
    model: torch.nn.Module, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Prompt encoded once per pair -> (chosen_logps [B], rejected_logps [B]) fp32.

    Equals `concatenated_forward` up to float rounding. Needs an attention implementation that
    takes a 4D mask unchanged (eager or sdpa); flash-attention models raise ValueError.
    """
    attn_implementation = _attn_implementation(model)
    if attn_implementation not in FOUR_D_MASK_ATTENTION:
        raise ValueError(
            f"prefix sharing needs a 4D attention mask, which attn_implementation="
            f"{attn_implementation!r} cannot take; load the model with attn_implementation="
            "'sdpa' (or 'eager'), or turn prefix sharing off"
        )
    shared = prefix_shared_batch(batch)
    inputs = dict(input_ids=shared.input_ids,
                  attention_mask=shared.attention_mask(attn_implementation),
                  position_ids=shared.position_ids, use_cache=False)
    token_logps = _predicted_logps(model, inputs, shared.source_rows, shared.source_positions,
                                   shared.targets)
    num_pairs = shared.input_ids.shape[0]
    logps = _per_sequence(token_logps, shared.sequence_index, 2 * num_pairs)
    return logps[:num_pairs], logps[num_pairs:]


def _packed_logps(model: torch.nn.Module, row: PackedRow) -> tuple[Tensor, Tensor]:
    """One forward over a packed row -> (chosen_logps [B], rejected_logps [B]) fp32; the
    attention that keeps its sequences apart is chosen by the model's implementation."""
    attn_implementation = _attn_implementation(model)
    inputs = dict(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False)
    if attn_implementation == PACKED_ATTENTION:
        # A 4D placeholder stops transformers building a mask (dense for SDPA); the packed
        # attention ignores it and reads the blocks.
        inputs["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool,
                                              device=row.input_ids.device)
        inputs["packed_blocks"] = row.blocks
    elif attn_implementation == "flex_attention" and row.input_ids.device.type == "cuda":
        inputs["attention_mask"] = row.flex_block_mask()
    elif attn_implementation in ("sdpa", "eager"):
        inputs["attention_mask"] = row.dense_mask(attn_implementation)
    else:
        raise ValueError(
            f"padding-free batches need attn_implementation 'sdpa' or 'eager' (or "
            f"'flex_attention' on CUDA); this model uses {attn_implementation!r}: load it with "
            "attn_implementation='sdpa', or turn --padding_free off")
    token_logps = _predicted_logps(model, inputs, torch.zeros_like(row.source_positions),
                                   row.source_positions, row.targets,
                                   kept=(row.kept_positions, row.kept_index))
    logps = _per_sequence(token_logps, row.sequence_index, row.num_sequences)
    num_pairs = row.num_sequences // 2
    return logps[:num_pairs], logps[num_pairs:]


def padding_free_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Chosen and rejected sequences packed into one row without padding -> (chosen_logps [B],
    rejected_logps [B]) fp32. Equals `concatenated_forward` up to float rounding."""
    return _packed_logps(model, packed_row(batch, prefix_shared=False))


def padding_free_prefix_shared_forward(
    model: torch.nn.Module, batch: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """`[prompt | chosen | rejected]` of every pair packed into one row without padding ->
    (chosen_logps [B], rejected_logps [B]) fp32. Equals `concatenated_forward` up to float
    rounding; each prompt is encoded once."""
    return _packed_logps(model, packed_row(batch, prefix_shared=True))


def packed_row(batch: dict, prefix_shared: bool) -> PackedRow:
    """The batch's packed layout: the one `PaddingFreeCollator` put in the batch (built on the
    CPU), or built here from the padded fields."""
    if batch.get(PackedRow.LAYOUT_KEY) == PackedRow.layout_name(prefix_shared):
        return PackedRow.from_batch(batch)
    if not prefix_shared:
        _check_pair_batch(batch, PAIR_FIELDS)
        return pack_sequences(
            torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
            torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
            torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
        )
    shared = prefix_shared_batch(batch)
    counts = torch.stack([(shared.segment_ids == kind).sum(-1) for kind in (
        PrefixSharedRows.PROMPT, PrefixSharedRows.CHOSEN, PrefixSharedRows.REJECTED)], dim=1)
    return pack_prefix_shared(shared.input_ids, shared.position_ids, counts, shared.source_rows,
                              shared.source_positions, shared.targets, shared.sequence_index)


class PaddingFreeCollator:
    """A pair collator whose batches also carry their packed layout (`PackedRow` fields),
    built here on the CPU, in the DataLoader: the padding-free forward then needs no host
    sync to find lengths and positions. The padded fields stay, for everything else that
    reads the batch (lengths, token counts)."""

    def __init__(self, collator, prefix_shared: bool):
        self.collator, self.prefix_shared = collator, prefix_shared

    def __call__(self, pairs) -> dict:
        batch = self.collator(pairs)
        batch.update(packed_row(batch, self.prefix_shared).to_batch(self.prefix_shared))
        return batch


def _attn_implementation(model: torch.nn.Module) -> str | None:
    return getattr(getattr(base_model_of(model), "config", None), "_attn_implementation", None)


# Prefix sharing feeds fewer tokens but attends over rows about twice as long (with a dense
# mask); measured on CPU it pays once the rows hold at least this much fewer tokens.
PREFIX_SHARING_MIN_SAVING = 0.2


def prefix_sharing_pays(prompt_lengths: Tensor, chosen_lengths: Tensor,
                        rejected_lengths: Tensor) -> bool:
    """Whether one prefix-shared row per pair (prompt + chosen + rejected) is at least
    PREFIX_SHARING_MIN_SAVING narrower than the two padded rows per pair of the standard
    forward (prompt + longer response). Lengths are per pair, [B], in tokens; a response
    length here counts the prompt too, as the attention masks do."""
    shared_width = (chosen_lengths + rejected_lengths - prompt_lengths).max()
    two_rows_width = 2 * torch.maximum(chosen_lengths, rejected_lengths).max()
    return bool(shared_width <= (1 - PREFIX_SHARING_MIN_SAVING) * two_rows_width)


def prefix_sharing_when_it_pays(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple:
    """`prefix_shared_forward` for batches where `prefix_sharing_pays` (long prompts), else
    `concatenated_forward`. Both give the same log-probs, so the choice is per batch."""
    if prefix_sharing_pays(batch["prompt_lengths"], batch["chosen_attention_mask"].sum(-1),
                           batch["rejected_attention_mask"].sum(-1)):
        return prefix_shared_forward(model, batch)
    return concatenated_forward(model, batch)


def resolve_padding_free(requested: bool | None, attn_implementation: str | None,
                         on_cuda: bool) -> bool:
    """--padding_free on: wherever some attention can keep packed sequences apart (a dense mask
    with eager); unset: where that attention is fast (SDPA per block, FlexAttention on CUDA)."""
    fast = attn_implementation in ("sdpa", PACKED_ATTENTION) or (
        attn_implementation == "flex_attention" and on_cuda)
    if requested is None:
        return fast
    return bool(requested) and (fast or attn_implementation == "eager")


def use_padding_free(model: torch.nn.Module, requested: bool | None) -> bool:
    """Resolve --padding_free for `model`; when on and the model uses SDPA, switch it to the
    per-block packed SDPA attention (the same numbers for every other input)."""
    base = base_model_of(model)
    attn_implementation = _attn_implementation(model)
    on_cuda = any(p.device.type == "cuda" for p in base.parameters())
    padding_free = resolve_padding_free(requested, attn_implementation, on_cuda)
    if padding_free and attn_implementation == "sdpa":
        use_packed_attention(base)
    return padding_free


def resolve_prefix_sharing(setting: bool | None, attn_implementation: str | None,
                           padding_free: bool = False) -> str:
    """--prefix_sharing on: "always"; unset: "per batch" (when it pays); off, or when the
    model's attention cannot take a 4D mask: "off" (the standard two-row forward).
    Padding-free rows share the prompt unless it is off: packed, sharing always saves tokens
    and widens nothing, and the packed attention keeps the parts apart."""
    if padding_free:
        return "off" if setting is False else "always"
    if setting is False or attn_implementation not in FOUR_D_MASK_ATTENTION:
        return "off"
    return "always" if setting else "per batch"


# The log-prob function for each prefix-sharing mode; all give the same log-probs.
LOGPS_FNS = {"off": concatenated_forward, "always": prefix_shared_forward,
             "per batch": prefix_sharing_when_it_pays}
PADDING_FREE_LOGPS_FNS = {"off": padding_free_forward,
                          "always": padding_free_prefix_shared_forward}


def logps_fn_for(prefix_sharing: str, padding_free: bool):
    """The log-prob function for a resolved prefix-sharing mode and padding-free setting."""
    return (PADDING_FREE_LOGPS_FNS if padding_free else LOGPS_FNS)[prefix_sharing]


def resolve_forward(model: torch.nn.Module, padding_free: bool | None,
                    prefix_sharing: bool | None) -> tuple[bool, str, LogpsFn]:
    """--padding_free and --prefix_sharing resolved for `model` (a flag asked for that the
    model's attention cannot do is said, and dropped) -> (padding_free, prefix-sharing mode,
    the log-prob function that runs them)."""
    attn_implementation = _attn_implementation(model)
    packed = use_padding_free(model, padding_free)
    if padding_free and not packed:
        logger.warning(f"--padding_free needs attn_implementation sdpa or eager (or "
                       f"flex_attention on CUDA), and this model uses {attn_implementation!r}: "
                       "padding as before.")
    mode = resolve_prefix_sharing(prefix_sharing, attn_implementation, packed)
    if prefix_sharing and mode == "off":
        logger.warning(f"--prefix_sharing needs attn_implementation sdpa or eager, and this "
                       f"model uses {attn_implementation!r}: using the standard two-row forward "
                       "instead.")
    return packed, mode, logps_fn_for(mode, packed)
