"""Sequence log-probabilities of preference pairs under a causal LM.

Three entry points, all returning fp32 sums of response-token log-probs:

- `sequence_logps(logits, labels)`: from logits you already have.
- `concatenated_forward(model, batch)`: chosen and rejected stacked into one forward of 2B rows.
- `prefix_shared_forward(model, batch)`: one row per pair, `[prompt | chosen | rejected]`, with a
  4D attention mask so the prompt is encoded once (arXiv 2410.20305). Same numbers, fewer tokens.

Memory: the log-softmax over the vocabulary is never materialised. Each label's log-prob is its
logit minus a logsumexp computed over a chunk of tokens at a time, upcast to fp32 per chunk only;
a custom autograd function recomputes the softmax chunk by chunk in backward. Both forwards ask
the model for logits only at positions whose next token is a label (`logits_to_keep` as a 2D
boolean mask, transformers 5), so prompt and padding positions never reach the LM head.

`model` may be a Hugging Face causal LM, a PEFT model, or an Accelerate/DDP wrapper of either:
it is always called at the top level so DDP hooks, autocast wrappers and
`peft_model.disable_adapter()` apply.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100

# fp32 elements per chunk of the logsumexp (16 MiB): large enough to keep the kernels efficient,
# small enough that the per-chunk upcast is negligible next to the logits themselves.
CHUNK_ELEMENTS = 1 << 22

# Attention implementations that take a ready-made 4D mask unchanged.
FOUR_D_MASK_ATTENTION = ("eager", "sdpa")

PAIR_FIELDS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_attention_mask",
    "rejected_labels",
)


class _LabelLogProbs(torch.autograd.Function):
    """log p(target) for rows of a logits matrix, chunked over rows.

    forward(logits [M, V] any float dtype, rows [N] long or None, targets [N] long) -> [N] fp32,
    out[i] = log_softmax(logits[rows[i]])[targets[i]]. Rows may repeat (prefix sharing predicts
    the first chosen and the first rejected token from the same position); rows=None means
    every row once, in order (N = M), which needs no gather and no zero-filled gradient.
    Peak extra memory: one fp32 chunk [rows_per_chunk, V], forward and backward (the gradient
    itself is [M, V] in the logits dtype, as autograd requires).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor | None, targets: Tensor) -> Tensor:
        token_logps = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
        logsumexps = torch.empty_like(token_logps)
        for chunk in _chunks(targets.shape[0], logits.shape[-1]):
            chunk_logits = _chunk_rows(logits, rows, chunk).float()
            logsumexps[chunk] = torch.logsumexp(chunk_logits, dim=-1)
            picked = chunk_logits.gather(1, targets[chunk, None]).squeeze(1)
            token_logps[chunk] = picked - logsumexps[chunk]
        ctx.save_for_backward(logits, rows, targets, logsumexps)
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps: Tensor) -> tuple[Tensor, None, None]:
        logits, rows, targets, logsumexps = ctx.saved_tensors
        grad_logits = torch.empty_like(logits) if rows is None else torch.zeros_like(logits)
        for chunk in _chunks(targets.shape[0], logits.shape[-1]):
            grad = grad_token_logps[chunk, None].float()
            # d/dlogits of (logit[target] - logsumexp) = onehot(target) - softmax.
            chunk_grad = _chunk_rows(logits, rows, chunk).float() - logsumexps[chunk, None]
            chunk_grad.exp_().mul_(-grad)
            chunk_grad.scatter_add_(1, targets[chunk, None], grad)
            if rows is None:
                grad_logits[chunk] = chunk_grad
            else:
                grad_logits.index_add_(0, rows[chunk], chunk_grad.to(logits.dtype))
        return grad_logits, None, None


def _chunks(num_rows: int, vocab_size: int) -> list[slice]:
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + rows_per_chunk) for start in range(0, num_rows, rows_per_chunk)]


def _chunk_rows(logits: Tensor, rows: Tensor | None, chunk: slice) -> Tensor:
    return logits[chunk] if rows is None else logits.index_select(0, rows[chunk])


def _sum_label_logps(
    logits: Tensor,
    rows: Tensor | None,
    targets: Tensor,
    sequence_index: Tensor,
    num_sequences: int,
) -> Tensor:
    """Sum of log p(targets[i] | logits[rows[i]]) per sequence_index[i] -> [num_sequences] fp32.

    rows=None: row i of logits for target i.
    """
    token_logps = _LabelLogProbs.apply(logits, rows, targets.long())
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=logits.device)
    return sums.index_add(0, sequence_index, token_logps)


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
    return _sum_label_logps(
        logits.reshape(batch_size * seq_len, vocab_size),
        rows=seq_index * seq_len + positions,
        targets=labels[seq_index, positions + 1],
        sequence_index=seq_index,
        num_sequences=batch_size,
    )


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/Accelerate/compile wrappers and a PEFT model.

    Only read to inspect its signature and config; it is never called.
    """
    inner = extract_model_from_parallel(model)
    get_base_model = getattr(inner, "get_base_model", None)  # PEFT
    return get_base_model() if callable(get_base_model) else inner


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(_unwrapped(model).forward).parameters


def _logits_at(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    keep: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """One top-level forward; logits wherever keep [R, L] is True, as a matrix.

    Returns (logits [M, V], row_of): the logits of position (r, t) are logits[row_of[r, t]].
    Models whose forward takes `logits_to_keep` compute only the kept positions, M = keep.sum(),
    in row-major order, and row_of is None; for the others M = R * L and row_of [R, L] is given.
    """
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    if _accepts_logits_to_keep(model):
        return model(**inputs, logits_to_keep=keep).logits, None
    logits = model(**inputs).logits  # [R, L, V]
    row_of = torch.arange(keep.numel(), device=keep.device).view_as(keep)
    return logits.reshape(keep.numel(), logits.shape[-1]), row_of


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

    keep = torch.zeros_like(labels, dtype=torch.bool)
    # Positions whose next token is a label. A real token must predict it: with an empty prompt
    # the first response token follows left padding (or nothing), and is not scored.
    keep[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & attention_mask[:, :-1].bool()
    logits, row_of = _logits_at(model, input_ids, attention_mask, position_ids, keep)

    seq_index, positions = keep.nonzero(as_tuple=True)  # row-major, the order of kept logits
    logps = _sum_label_logps(
        logits,
        rows=None if row_of is None else row_of[seq_index, positions],
        targets=labels[seq_index, positions + 1],
        sequence_index=seq_index,
        num_sequences=labels.shape[0],
    )
    num_pairs = batch["chosen_input_ids"].shape[0]
    return logps[:num_pairs], logps[num_pairs:]


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
        if attn_implementation == "sdpa":
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
    config = getattr(_unwrapped(model), "config", None)
    attn_implementation = getattr(config, "_attn_implementation", None)
    if attn_implementation not in FOUR_D_MASK_ATTENTION:
        raise ValueError(
            f"prefix sharing needs a 4D attention mask, which attn_implementation="
            f"{attn_implementation!r} cannot take; load the model with attn_implementation="
            "'sdpa' (or 'eager'), or turn prefix sharing off"
        )
    shared = prefix_shared_batch(batch)
    keep = torch.zeros_like(shared.input_ids, dtype=torch.bool)
    keep[shared.source_rows, shared.source_positions] = True
    logits, row_of = _logits_at(
        model,
        shared.input_ids,
        shared.attention_mask(attn_implementation),
        shared.position_ids,
        keep,
    )
    if row_of is None:  # logits of the kept positions only, in row-major order
        row_of = keep.flatten().cumsum(0).sub_(1).view_as(keep)
    num_pairs = shared.input_ids.shape[0]
    logps = _sum_label_logps(
        logits,
        rows=row_of[shared.source_rows, shared.source_positions],
        targets=shared.targets,
        sequence_index=shared.sequence_index,
        num_sequences=2 * num_pairs,
    )
    return logps[:num_pairs], logps[num_pairs:]


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


def resolve_prefix_sharing(setting: bool | None, attn_implementation: str | None) -> str:
    """--prefix_sharing on: "always"; unset: "per batch" (when it pays); off, or when the
    model's attention cannot take a 4D mask: "off" (the standard two-row forward)."""
    if setting is False or attn_implementation not in FOUR_D_MASK_ATTENTION:
        return "off"
    return "always" if setting else "per batch"


# The log-prob function for each prefix-sharing mode; all give the same log-probs.
LOGPS_FNS = {"off": concatenated_forward, "always": prefix_shared_forward,
             "per batch": prefix_sharing_when_it_pays}
