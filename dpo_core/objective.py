"""One micro-batch through the policy and the reference, into per-pair losses and rewards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpo_core.logps import concatenated_forward
from dpo_core.loss import preference_loss
from dpo_core.reference import ReferenceContext, adapter_disabled

LogpsFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


def response_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens per pair ([B] each): the labels that are not -100."""
    return (
        (batch["chosen_labels"] != -100).sum(-1),
        (batch["rejected_labels"] != -100).sum(-1),
    )


@dataclass(frozen=True)
class PreferenceObjective:
    """The loss settings plus how log-probs are computed; call it on (model, batch)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    reference_free: bool = False
    logps_fn: LogpsFn = concatenated_forward
    # Which network the reference pass runs (dpo_core/reference.py): by default the policy
    # with its adapter switched off.
    reference: ReferenceContext = adapter_disabled

    @property
    def uses_reference(self) -> bool:
        return not (self.reference_free or self.loss_type == "simpo")

    def reference_logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Log-probs ([B] each) under the network `self.reference` gives for `model`.

        Precomputed values in the batch (`reference_chosen_logps`, ...) are used as they are.
        """
        if not self.uses_reference:
            return None, None
        if "reference_chosen_logps" in batch:
            return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        with torch.no_grad(), self.reference(model) as reference_model:
            return self.logps_fn(reference_model, batch)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """Per-pair tensors [B]: `losses` (with grad) and detached rewards and log-probs."""
        policy_chosen, policy_rejected = self.logps_fn(model, batch)
        reference_chosen, reference_rejected = self.reference_logps(model, batch)
        chosen_lengths, rejected_lengths = response_lengths(batch)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            self.loss_type,
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            rpo_alpha=self.rpo_alpha,
            simpo_gamma=self.simpo_gamma,
        )
        return {
            "losses": losses,
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "policy_chosen_logps": policy_chosen.detach(),
            "policy_rejected_logps": policy_rejected.detach(),
        }
