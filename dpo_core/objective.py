"""One micro-batch through the policy and the reference, into per-pair losses and rewards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dpo_core.logps import LogpsFn, concatenated_forward
from dpo_core.loss import LossSettings, loss_settings_of, preference_loss
from dpo_core.reference import ReferenceContext, adapter_disabled


def response_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens per pair ([B] each): the labels that are not -100."""
    return (
        (batch["chosen_labels"] != -100).sum(-1),
        (batch["rejected_labels"] != -100).sum(-1),
    )


@dataclass(frozen=True)
class PreferenceObjective(LossSettings):
    """The loss settings plus how log-probs are computed; call it on (model, batch).

    The batch-wide losses (aot's sorting, the pooled NLL of sft/rpo/cpo/orpo) see this
    micro-batch on this process, as in trl: see ``dpo_core.loss``.
    """

    reference_free: bool = False
    logps_fn: LogpsFn = concatenated_forward
    # Which network the reference pass runs (dpo_core/reference.py): by default the policy
    # with its adapter switched off.
    reference: ReferenceContext = adapter_disabled

    @classmethod
    def from_config(cls, config: object, logps_fn: LogpsFn) -> PreferenceObjective:
        """The loss fields of a ``TrainConfig`` (same names) plus ``logps_fn``."""
        settings = dataclasses.asdict(loss_settings_of(config))
        return cls(**settings, reference_free=config.reference_free, logps_fn=logps_fn)

    @property
    def uses_reference(self) -> bool:
        return self.needs_reference and not self.reference_free

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
        """Per-pair tensors [B]: `losses` (with grad), detached rewards and log-probs, and for
        a mixture each unweighted term under `loss/<type>`."""
        policy_chosen, policy_rejected = self.logps_fn(model, batch)
        reference_chosen, reference_rejected = self.reference_logps(model, batch)
        chosen_lengths, rejected_lengths = response_lengths(batch)
        terms = preference_loss(
            self,
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        return {
            "losses": terms.losses,
            "chosen_rewards": terms.chosen_rewards,
            "rejected_rewards": terms.rejected_rewards,
            "policy_chosen_logps": policy_chosen.detach(),
            "policy_rejected_logps": policy_rejected.detach(),
            **{f"loss/{name}": values for name, values in terms.components.items()},
        }
