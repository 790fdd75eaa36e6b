"""The router's load-balancing loss of mixture-of-experts models (Mixtral, Qwen2-MoE, ...).

trl adds `router_aux_loss_coef * aux_loss` of the policy's forward to the DPO loss, aux_loss
being the Switch Transformer loss of transformers' `load_balancing_loss_func` over the tokens
of the concatenated chosen and rejected rows. Here the forwards feed other rows (a prompt once
for two responses, packed rows), so the loss is computed from the router logits with each fed
token weighted by the number of sequences it stands for (a shared prompt token: 2): the value
of every path is the one of the padded two-row forward, which is the model's own `aux_loss`.

    f_e = sum_l sum_t w_t [e in top_k(t, l)] / (L sum_t w_t)   (fraction routed to e)
    P_e = sum_l sum_t w_t softmax(router_logits[l, t])_e / (L sum_t w_t)
    aux = E * sum_e f_e P_e

Use: `with router_logits_recorded() as routed:` around the policy's forward; every
`predicted_logps` inside asks the model for its router logits and adds them, with the fed
tokens' weights, to `routed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

_RECORDING: ContextVar[RoutedTokens | None] = ContextVar("dpo_router_logits", default=None)


@dataclass
class RoutedTokens:
    """Router logits of the forwards run while recording: per forward, one [N, E] tensor per
    MoE layer and the fed tokens' weights [N]."""

    forwards: list[tuple[tuple[Tensor, ...], Tensor]] = field(default_factory=list)

    def add(self, router_logits: tuple[Tensor, ...] | None, token_weights: Tensor) -> None:
        if not router_logits:
            raise ValueError("the model returned no router logits: it is not a mixture of "
                             "experts transformers can record; set --router_aux_loss_coef 0")
        self.forwards.append((tuple(router_logits), token_weights.reshape(-1)))

    def load_balancing_loss(self, num_experts: int, top_k: int) -> Tensor:
        """The auxiliary loss (module docstring) over every recorded token, fp32 scalar."""
        routed = torch.zeros(num_experts, dtype=torch.float32)
        probability = torch.zeros(num_experts, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32)
        for layers, weights in self.forwards:
            weights = weights.float()
            routed, probability, total = (t.to(weights.device)
                                          for t in (routed, probability, total))
            for logits in layers:
                probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
                chosen = probs.topk(top_k, dim=-1).indices  # [N, top_k]
                routed = routed.index_add(0, chosen.reshape(-1),
                                          weights.repeat_interleave(top_k))
                probability = probability + (probs * weights[:, None]).sum(0)
                total = total + weights.sum()
        return num_experts * ((routed / total) * (probability / total)).sum()


@contextlib.contextmanager
def router_logits_recorded() -> Iterator[RoutedTokens]:
    """Record the router logits of every `predicted_logps` forward inside the block."""
    routed = RoutedTokens()
    token = _RECORDING.set(routed)
    try:
        yield routed
    finally:
        _RECORDING.reset(token)


def recording() -> RoutedTokens | None:
    """Where the current forward's router logits go, if they are recorded."""
    return _RECORDING.get()
