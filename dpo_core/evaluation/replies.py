"""Replies of the policy and of the reference to the same prompts, and what they say about the
trained model: how long the replies are, whether they end on their own, whether they repeat
themselves, and how far the policy moved from the reference on its own replies.

The sequence KL estimate is  mean over prompts of  log pi(y|x) - log pi_ref(y|x)  for y the
policy's reply (its stop token included): the reply is scored under both networks by the
log-prob code training uses (`dpo_core.forward.logps.labelled_logps`). It estimates
KL(pi || pi_ref) when the replies are samples of pi itself (--temperature 1, --top_p 1); greedy
or tempered replies make it the log-ratio on those replies, nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo_core.data.batches import pad_rows
from dpo_core.evaluation.statistics import length_summary, repeated_ngram_rate
from dpo_core.forward.logps import labelled_logps
from dpo_core.modeling.generation import GeneratedReply
from dpo_core.modeling.loading import eval_mode

# The n of the repeated n-gram rate (in tokens): long enough that ordinary text rarely
# repeats one, short enough to catch a reply that loops.
REPEAT_NGRAM = 4


@torch.no_grad()
def reply_logps(model: torch.nn.Module, replies: Sequence[GeneratedReply], pad_token_id: int,
                batch_size: int) -> list[float]:
    """log p(reply | prompt) under `model` of each reply's tokens, its stop token included
    (fp32 sums, as training's log-probs)."""
    device = next(model.parameters()).device
    values: list[float] = []
    with eval_mode(model):
        for start in range(0, len(replies), batch_size):
            rows = [(r.prompt_ids, r.scored_ids) for r in replies[start:start + batch_size]]
            tensors = (t.to(device) for t in pad_rows(rows, pad_token_id))
            values += labelled_logps(model, *tensors).tolist()
    return values


def reply_statistics(replies: Sequence[GeneratedReply]) -> dict[str, float]:
    """Length in tokens (mean, median, 90th percentile; the stop token not counted), the share
    that stopped on their own, and the repeated n-gram rate."""
    lengths = length_summary([len(r.reply_ids) for r in replies])
    return {
        **{f"length_{name}": value for name, value in lengths.items()},
        "stopped": sum(r.stopped for r in replies) / len(replies),
        f"repeated_{REPEAT_NGRAM}gram_rate": repeated_ngram_rate(
            [r.reply_ids for r in replies], REPEAT_NGRAM),
    }
