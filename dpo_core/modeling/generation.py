"""Greedy or sampled replies from a chat model, batched with left padding and the KV cache,
cut from the output by token ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_core.data.templates import encode_prompt, stop_token_ids
from dpo_core.modeling.backends import forward_is_collective
from dpo_core.modeling.loading import eval_mode


@dataclass(frozen=True)
class GeneratedReply:
    """One reply: its text, the prompt's and the reply's token ids, and how it ended.

    `reply_ids` stop before the stop token; `stop_id` is the stop token the model wrote (None:
    cut at max_new_tokens, the reply did not end on its own). `scored_ids` are the tokens the
    model chose, the stop token included: what its log-prob is the log-prob of.
    """

    text: str
    prompt_ids: list[int]
    reply_ids: list[int]
    stop_id: int | None

    @property
    def stopped(self) -> bool:
        return self.stop_id is not None

    @property
    def scored_ids(self) -> list[int]:
        return self.reply_ids + ([self.stop_id] if self.stopped else [])


def until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """`ids` up to (not including) the first stop token."""
    for position, token_id in enumerate(ids):
        if token_id in stop_ids:
            return ids[:position]
    return ids


def model_stop_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                   use_chat_template: bool) -> list[int]:
    """`stop_token_ids` with the EOS ids of the model's generation config."""
    generation_config = getattr(model, "generation_config", None)
    return stop_token_ids(tokenizer, use_chat_template,
                          getattr(generation_config, "eos_token_id", None))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]] | str],
    *,
    use_chat_template: bool = True,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    progress: str | None = None,
) -> list[GeneratedReply]:
    """One reply per prompt (messages or plain text), rendered exactly as in training.

    Prompts are left-padded so every row's reply starts at the same column, and decoded with
    the KV cache; the reply is the ids after that column, up to the first stop token
    (`stop_token_ids`: EOS, and with the template its end-of-turn token), so nothing depends
    on string lengths. Sampling draws from torch's global generator: seed it for repeatable
    replies. `progress`: the description of a progress bar over the batches (None: no bar).
    With weights sharded across processes (FSDP2, ZeRO-3) every process must call it with the
    same prompts.
    """
    replies: list[GeneratedReply] = []
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    stop_ids = model_stop_ids(model, tokenizer, use_chat_template)
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p}
                if do_sample else {"do_sample": False})
    starts = range(0, len(prompts), batch_size)
    # Sharded weights: every process generates the same prompts, each stepping until all
    # are done (`synced_gpus`), since each forward gathers the weights from all of them.
    synced = forward_is_collective(model)
    with eval_mode(model):
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None,
                          dynamic_ncols=True):
            encoded = [encode_prompt(tokenizer, p, use_chat_template)
                       for p in prompts[start:start + batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=stop_ids,
                use_cache=True,
                synced_gpus=synced,
                **sampling,
            )
            for prompt_ids, row in zip(encoded, output[:, width:].tolist(), strict=True):
                reply_ids = until_stop(row, stop_ids)
                stop_id = row[len(reply_ids)] if len(reply_ids) < len(row) else None
                text = tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
                replies.append(GeneratedReply(text, prompt_ids, reply_ids, stop_id))
    return replies


def generate_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]] | str],
    **options,
) -> list[str]:
    """The text of `generate`'s replies (same options)."""
    return [reply.text for reply in generate(model, tokenizer, prompts, **options)]
