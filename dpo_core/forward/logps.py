"""Sequence log-probabilities of preference pairs under a causal LM: the kernels, and the
standard forward.

Every forward path computes `TokenLogps`: the fp32 log-prob of each response token, with the
sequence it belongs to, before anything is summed; `TokenLogps.sums()` gives the per-sequence
sums DPO compares, and the loss options that weigh tokens (LD-DPO's `--ld_alpha`, WPO's
`--use_weighting`) read the tokens themselves. Entry points here:

- `sequence_logps(logits, labels)`: sums from logits you already have.
- `concatenated_token_logps(model, batch)`: chosen and rejected stacked into one forward of 2B
  rows; `concatenated_forward(model, batch)` is its sums.
- `labelled_logps(model, input_ids, attention_mask, labels)`: sums for any padded rows, e.g.
  generated replies scored under the policy and the reference.
- `predicted_logps(model, inputs, ...)`: the one forward every layout goes through (the
  prefix-shared and padding-free layouts of `prefix_sharing.py` and `packing.py` included).

Memory: no `[tokens, vocab]` logits tensor is ever built. The model's own head projects no
position (`logits_to_keep` as an empty index, which every transformers 5 takes); the decoder's
hidden states at label-predicting positions are gathered and `head_label_logps` projects them a
chunk at a time, each label's log-prob its logit minus a logsumexp in fp32, with a custom
backward (frozen linear head) or per-chunk recomputation (any other head). Models whose logits
are post-processed (soft-capping, scaling) are asked for their full logits instead, a trainable
head sharded by FSDP2 (or any head under ZeRO-3) projects the needed positions inside the
model's forward, and `sequence_logps` works on given logits with the same chunking.

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

from dpo_core.data.tokenization import IGNORE_INDEX
from dpo_core.forward.router import recording
from dpo_core.modeling.backends import is_fsdp2_model, is_zero3_model
from dpo_core.modeling.loading import base_model_of

# fp32 elements per chunk of the logsumexp (16 MiB): large enough to keep the kernels efficient,
# small enough that the per-chunk upcast is negligible next to the logits themselves.
CHUNK_ELEMENTS = 1 << 22

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


@dataclass(frozen=True)
class TokenLogps:
    """The response tokens' log-probs of a micro-batch of B pairs, before they are summed.

    logps [N] fp32 (with grad): log p(label) of every scored response token.
    sequence_index [N] long: whose token it is, b for pair b's chosen response, B + b for its
        rejected one; the tokens of one sequence appear in position order.
    num_pairs: B.
    log_sum_sq_probs [N] fp32 or None: log sum_v p_v^2 of the distribution each token was
        predicted from (WPO's normaliser), detached; computed only when asked for.
    """

    logps: Tensor
    sequence_index: Tensor
    num_pairs: int
    log_sum_sq_probs: Tensor | None = None

    def sums(self) -> tuple[Tensor, Tensor]:
        """(chosen_logps [B], rejected_logps [B]): each sequence's summed log-prob."""
        sums = per_sequence(self.logps, self.sequence_index, 2 * self.num_pairs)
        return sums[:self.num_pairs], sums[self.num_pairs:]


# (model, batch, *, log_sum_sq_probs=False) -> TokenLogps: one forward path.
TokenLogpsFn = Callable[..., TokenLogps]
# (model, batch) -> (chosen_logps [B], rejected_logps [B]), fp32: the log-probs a loss compares.
LogpsFn = Callable[[torch.nn.Module, dict], tuple[Tensor, Tensor]]


class _LabelLogProbs(torch.autograd.Function):
    """log p(target) for rows of a logits matrix, chunked over rows.

    forward(logits [M, V] any float dtype, rows [N] long, targets [N] long, with_sum_sq bool)
    -> ([N] fp32, [N] fp32 or None): out[i] = log_softmax(logits[rows[i]])[targets[i]], and with
    `with_sum_sq` the non-differentiable log sum_v softmax(logits[rows[i]])_v^2. Rows may repeat
    (prefix sharing predicts the first chosen and the first rejected token from one position).
    Peak extra memory: one fp32 chunk [rows_per_chunk, V], forward and backward (the gradient
    itself is [M, V] in the logits dtype, as autograd requires).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, targets: Tensor,
                with_sum_sq: bool) -> tuple[Tensor, Tensor | None]:
        token_logps = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
        logsumexps = torch.empty_like(token_logps)
        sum_sq = torch.empty_like(token_logps) if with_sum_sq else None
        for chunk in _chunks(targets.shape[0], logits.shape[-1]):
            chunk_logits = logits.index_select(0, rows[chunk]).float()
            logsumexps[chunk] = torch.logsumexp(chunk_logits, dim=-1)
            picked = chunk_logits.gather(1, targets[chunk, None]).squeeze(1)
            token_logps[chunk] = picked - logsumexps[chunk]
            if with_sum_sq:  # log sum p^2 = logsumexp(2 z) - 2 logsumexp(z)
                sum_sq[chunk] = torch.logsumexp(2 * chunk_logits, dim=-1) - 2 * logsumexps[chunk]
        ctx.save_for_backward(logits, rows, targets, logsumexps)
        if with_sum_sq:
            ctx.mark_non_differentiable(sum_sq)
        return token_logps, sum_sq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps: Tensor, _grad_sum_sq) -> tuple[Tensor, None, None, None]:
        logits, rows, targets, logsumexps = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for chunk in _chunks(targets.shape[0], logits.shape[-1]):
            grad = grad_token_logps[chunk, None].float()
            # d/dlogits of (logit[target] - logsumexp) = onehot(target) - softmax.
            chunk_grad = logits.index_select(0, rows[chunk]).float() - logsumexps[chunk, None]
            chunk_grad.exp_().mul_(-grad)
            chunk_grad.scatter_add_(1, targets[chunk, None], grad)
            grad_logits.index_add_(0, rows[chunk], chunk_grad.to(logits.dtype))
        return grad_logits, None, None, None


def _chunks(num_rows: int, vocab_size: int) -> list[slice]:
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + rows_per_chunk) for start in range(0, num_rows, rows_per_chunk)]


class _FrozenHeadLabelLogProbs(torch.autograd.Function):
    """log p(target) through a frozen linear LM head, chunked over predictions.

    forward(hidden [M, H], rows [N] long, targets [N] long, weight [V, H], bias [V] or None,
    with_sum_sq bool) -> ([N] fp32, [N] fp32 or None): out[i] = log_softmax(hidden[rows[i]] @
    weight.T + bias)[targets[i]], and with `with_sum_sq` the non-differentiable log sum_v p_v^2
    of the same distribution.
    The head is frozen, so the only gradient is the one to `hidden`, and it is linear in the
    upstream gradient: d out[i] / d hidden[rows[i]] = weight[targets[i]] - softmax_i @ weight.
    Forward computes that [N, H] Jacobian chunk by chunk (the matmul a backward would do), so
    backward is a scaled index_add and the logits are never recomputed.
    Peak extra memory: one fp32 [rows_per_chunk, V] chunk, plus the [N, H] Jacobian.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, rows: Tensor, targets: Tensor, weight: Tensor,
                bias: Tensor | None, with_sum_sq: bool) -> tuple[Tensor, Tensor | None]:
        needs_grad = ctx.needs_input_grad[0]
        token_logps = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
        sum_sq = torch.empty_like(token_logps) if with_sum_sq else None
        jacobian = (torch.empty(targets.shape[0], hidden.shape[-1], dtype=hidden.dtype,
                                device=hidden.device) if needs_grad else None)
        for chunk in _chunks(targets.shape[0], weight.shape[0]):
            # One fused log_softmax (fp32), read for the label and exponentiated in place for
            # the softmax: fewer passes over the [chunk, V] block than logsumexp, sub and exp.
            chunk_logps = torch.log_softmax(
                F.linear(hidden.index_select(0, rows[chunk]), weight, bias).float(), dim=-1)
            token_logps[chunk] = chunk_logps.gather(1, targets[chunk, None]).squeeze(1)
            if with_sum_sq:
                sum_sq[chunk] = torch.logsumexp(2 * chunk_logps, dim=-1)
            if needs_grad:
                probs = chunk_logps.exp_()
                expected = probs.to(weight.dtype) @ weight  # [chunk, H]: E_softmax[weight row]
                jacobian[chunk] = (weight[targets[chunk]] - expected).to(hidden.dtype)
        ctx.save_for_backward(rows, jacobian)
        ctx.num_hidden = hidden.shape[0]
        if with_sum_sq:
            ctx.mark_non_differentiable(sum_sq)
        return token_logps, sum_sq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_token_logps: Tensor,
                 _grad_sum_sq) -> tuple[Tensor, None, None, None, None, None]:
        rows, jacobian = ctx.saved_tensors
        grad_hidden = torch.zeros(ctx.num_hidden, jacobian.shape[-1], dtype=jacobian.dtype,
                                  device=jacobian.device)
        scaled = jacobian * grad_token_logps[:, None].to(jacobian.dtype)
        return grad_hidden.index_add_(0, rows, scaled), None, None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def head_label_logps(head: torch.nn.Module, hidden: Tensor, rows: Tensor, targets: Tensor,
                     with_sum_sq: bool = False) -> tuple[Tensor, Tensor | None]:
    """log_softmax(head(hidden[rows[i]]))[targets[i]] -> [N] fp32, chunk by chunk; with
    `with_sum_sq` also log sum_v p_v^2 of each distribution ([N] fp32, detached), else None.

    hidden [M, H]; rows, targets [N]. A frozen `nn.Linear` head (LoRA's default: the head is
    not a target) goes through `_FrozenHeadLabelLogProbs`. Any other head (trainable, an
    adapter on it, `modules_to_save`, quantized) is called as the module it is, one chunk at
    a time under activation checkpointing, so backward recomputes one chunk's logits at a
    time instead of keeping all of them.
    """
    targets = targets.long()
    if _frozen_linear(head):
        return _FrozenHeadLabelLogProbs.apply(hidden, rows, targets, head.weight, head.bias,
                                              with_sum_sq)

    def chunk_logps(chunk_hidden: Tensor, chunk_targets: Tensor) -> tuple[Tensor, Tensor]:
        chunk_logps = torch.log_softmax(head(chunk_hidden).float(), dim=-1)
        picked = chunk_logps.gather(1, chunk_targets[:, None]).squeeze(1)
        sum_sq = (torch.logsumexp(2 * chunk_logps.detach(), dim=-1) if with_sum_sq
                  else picked.new_zeros(0))
        return picked, sum_sq

    vocab_size = getattr(head, "out_features", None) or head.weight.shape[0]
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
    parts, sum_sq_parts = [empty], [empty]
    for chunk in _chunks(targets.shape[0], vocab_size):
        chunk_hidden = hidden.index_select(0, rows[chunk])
        picked, sum_sq = (checkpoint(chunk_logps, chunk_hidden, targets[chunk],
                                     use_reentrant=False)
                          if needs_grad else chunk_logps(chunk_hidden, targets[chunk]))
        parts.append(picked)
        sum_sq_parts.append(sum_sq)
    return torch.cat(parts), torch.cat(sum_sq_parts) if with_sum_sq else None


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
    token_logps, _ = _LabelLogProbs.apply(logits.reshape(batch_size * seq_len, vocab_size),
                                          seq_index * seq_len + positions,
                                          labels[seq_index, positions + 1].long(), False)
    return per_sequence(token_logps, seq_index, batch_size)


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


def _hidden_states(model: torch.nn.Module, decoder: torch.nn.Module,
                   inputs: dict) -> tuple[Tensor, object]:
    """The decoder's last hidden states [R, L, H] from one top-level forward (so DDP hooks,
    autocast wrappers and `disable_adapter()` apply), and the model's output. The model's own
    head projects no position at all: `logits_to_keep` as an empty 1D index tensor, which
    every transformers 5 takes (the 2D boolean mask only exists from 5.21 on)."""
    captured = []
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    nothing = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        output = model(**inputs, logits_to_keep=nothing)
    finally:
        hook.remove()
    return captured[-1], output


def predicted_logps(
    model: torch.nn.Module,
    inputs: dict,
    source_rows: Tensor,
    source_positions: Tensor,
    targets: Tensor,
    kept: tuple[Tensor, Tensor] | None = None,
    token_weights: Tensor | None = None,
    log_sum_sq_probs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One forward over `inputs` (input_ids [R, L], masks, position ids, ...) -> [N] fp32:
    log p(targets[i]) under the prediction at (source_rows[i], source_positions[i]); and with
    `log_sum_sq_probs` the detached log sum_v p_v^2 of each prediction ([N] fp32), else None.

    The LM head only ever sees the hidden states of those positions, projected chunk by chunk
    by `head_label_logps`: no [tokens, vocab] logits tensor exists. Models that post-process
    their logits are asked for full logits instead, and a trainable head under FSDP2 for the
    logits of the needed positions only. `kept` = (kept_positions [M], kept_index
    [N]): the distinct predicting positions (flat, row-major over [R, L]) and which of them
    predicts target i, when computed beforehand (on the CPU, by the collator): then nothing
    here waits for the device. While router logits are recorded (`router.py`), the model is
    asked for them, and they are recorded with `token_weights` [R, L]: how many sequences each
    fed token stands for (default: the 2D attention mask).
    """
    routed = recording()
    if routed is not None:
        inputs = {**inputs, "output_router_logits": True}
    shape = inputs["input_ids"].shape
    parts = _decoder_and_head(model)
    # FSDP2 gathers and frees the root unit's weights (the head's among them) around the root's
    # own forward and backward; a trainable head called outside it crashed (SIGSEGV, CPU, full
    # fine-tuning). ZeRO-3 holds the head's weight whole only inside the head's own forward. So
    # the model projects the positions any target needs itself there: `logits_to_keep` as their
    # column index.
    sharded_head = parts is not None and (
        is_fsdp2_model(model) and any(p.requires_grad for p in parts[1].parameters())
        or is_zero3_model(parts[1]))
    if parts is not None and not sharded_head:
        logps_and_sum_sq, output = _hand_projected_logps(model, *parts, inputs, source_rows,
                                                         source_positions, targets, kept,
                                                         log_sum_sq_probs)
    else:
        if parts is None:
            output = model(**inputs)  # logits [R, L, V]
            rows = source_rows * shape[1] + source_positions
        else:
            columns, column_of = torch.unique(source_positions, return_inverse=True)
            output = model(**inputs, logits_to_keep=columns)  # logits [R, C, V]
            rows = source_rows * columns.numel() + column_of
        logps_and_sum_sq = _LabelLogProbs.apply(
            output.logits.reshape(-1, output.logits.shape[-1]), rows, targets.long(),
            log_sum_sq_probs)
    if routed is not None:
        routed.add(getattr(output, "router_logits", None),
                   inputs["attention_mask"] if token_weights is None else token_weights)
    return logps_and_sum_sq


def _hand_projected_logps(model: torch.nn.Module, decoder: torch.nn.Module,
                          head: torch.nn.Module, inputs: dict, source_rows: Tensor,
                          source_positions: Tensor, targets: Tensor,
                          kept: tuple[Tensor, Tensor] | None,
                          log_sum_sq_probs: bool) -> tuple[tuple[Tensor, Tensor | None], object]:
    """`predicted_logps` through the decoder's hidden states at the kept positions and the
    head applied to them by `head_label_logps`; and the model's output."""
    shape = inputs["input_ids"].shape
    if kept is None:  # the distinct predicting positions, flat and sorted, and which is whose
        kept = torch.unique(source_rows * shape[1] + source_positions, return_inverse=True)
    hidden, output = _hidden_states(model, decoder, inputs)
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept[0])  # [M, H]
    return head_label_logps(head, kept_hidden, kept[1], targets, log_sum_sq_probs), output


def check_pair_batch(batch: dict[str, Tensor], fields: tuple[str, ...]) -> None:
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


def concatenated_token_logps(model: torch.nn.Module, batch: dict[str, Tensor], *,
                             log_sum_sq_probs: bool = False) -> TokenLogps:
    """Chosen and rejected in ONE forward of 2B rows -> their response tokens' `TokenLogps`.

    Position ids come from the attention mask (cumsum - 1), so left and right padding give the
    same numbers, and each row is independent of the others in the batch.
    """
    check_pair_batch(batch, PAIR_FIELDS)
    token_logps, seq_index, sum_sq = _labelled_token_logps(
        model,
        torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
        log_sum_sq_probs,
    )
    return TokenLogps(token_logps, seq_index, batch["chosen_input_ids"].shape[0], sum_sq)


def concatenated_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen_logps [B], rejected_logps [B]) fp32: the sums of `concatenated_token_logps`."""
    return concatenated_token_logps(model, batch).sums()


def labelled_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   labels: Tensor) -> Tensor:
    """One forward of padded rows (input_ids, attention_mask, labels [R, T]) -> [R] fp32: each
    row's sum of log-probs of its labels (IGNORE_INDEX skipped). Position ids come from the
    attention mask, so left and right padding give the same numbers."""
    token_logps, seq_index, _ = _labelled_token_logps(model, input_ids, attention_mask, labels)
    return per_sequence(token_logps, seq_index, labels.shape[0])


def _labelled_token_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                          labels: Tensor, log_sum_sq_probs: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The log-prob [N] fp32 of every label of padded rows [R, T], the row of each [N], and
    with `log_sum_sq_probs` WPO's log sum_v p_v^2 of each prediction [N] (else None)."""
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
    token_logps, sum_sq = predicted_logps(model, inputs, seq_index, positions,
                                          labels[seq_index, positions + 1], kept,
                                          log_sum_sq_probs=log_sum_sq_probs)
    return token_logps, seq_index, sum_sq


def per_sequence(token_logps: Tensor, sequence_index: Tensor, num_sequences: int) -> Tensor:
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, sequence_index, token_logps)
