"""One micro-batch through the policy and the reference, into per-pair losses and rewards."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dpo_core.data.tokenization import IGNORE_INDEX
from dpo_core.forward.logps import TokenLogps, TokenLogpsFn, concatenated_token_logps
from dpo_core.forward.offloading import ActivationOffload
from dpo_core.losses.functions import length_desensitized_logps, wpo_weights
from dpo_core.losses.options import LossSettings
from dpo_core.losses.preference import preference_loss
from dpo_core.modeling.reference import ReferenceContext, adapter_disabled


def response_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens per pair ([B] each): the labels that are not IGNORE_INDEX."""
    return (
        (batch["chosen_labels"] != IGNORE_INDEX).sum(-1),
        (batch["rejected_labels"] != IGNORE_INDEX).sum(-1),
    )


@dataclass
class PreferenceObjective(LossSettings):
    """The loss options plus how log-probs are computed; call it on (model, batch, reference).

    `reference` is which network the reference pass runs (`dpo_core.modeling.reference`); None
    is the policy with its adapter switched off. The batch-wide losses (aot's sorting, the
    pooled NLL of sft/rpo/cpo/orpo) see this micro-batch on this process, as in trl: see
    ``dpo_core.losses.functions``. `token_logps_fn` is the forward path (`Forward.token_logps`);
    `activation_offloading` keeps the policy forward's saved activations in host memory.
    """

    reference_free: bool = False
    token_logps_fn: TokenLogpsFn = concatenated_token_logps
    activation_offloading: bool = False

    @classmethod
    def from_config(cls, config: object, token_logps_fn: TokenLogpsFn) -> PreferenceObjective:
        """The loss options, --reference_free and --activation_offloading of a ``TrainConfig``,
        with ``token_logps_fn``."""
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(LossSettings)}
        return cls(**options, reference_free=config.reference_free,
                   token_logps_fn=token_logps_fn,
                   activation_offloading=config.activation_offloading)

    @property
    def uses_reference(self) -> bool:
        return self.needs_reference and not self.reference_free

    def sequence_logps(self, tokens: TokenLogps) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]): the log-probs the losses compare, summed over the
        response tokens, LD-DPO's weighted sums with --ld_alpha."""
        if self.ld_alpha is None:
            return tokens.sums()
        return length_desensitized_logps(tokens.logps, tokens.sequence_index, tokens.num_pairs,
                                         self.ld_alpha)

    def reference_logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
        reference: ReferenceContext | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Log-probs ([B] each) under the network `reference` gives for `model` (None: the
        policy with its adapter switched off); (None, None) when the loss uses no reference.

        Precomputed values in the batch (`reference_chosen_logps`, ...) are used as they are.
        """
        if not self.uses_reference:
            return None, None
        if "reference_chosen_logps" in batch:
            return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        with torch.no_grad(), (reference or adapter_disabled)(model) as reference_model:
            return self.sequence_logps(self.token_logps_fn(reference_model, batch))

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 reference: ReferenceContext | None = None) -> dict:
        """Per-pair tensors [B]: `losses` (with grad), detached rewards and log-probs, for a
        mixture each term under `loss/<type>`, and with --use_weighting the `wpo_weights`."""
        offload = (ActivationOffload(model) if self.activation_offloading and
                   torch.is_grad_enabled() else nullcontext())
        with offload:
            tokens = self.token_logps_fn(model, batch, log_sum_sq_probs=self.use_weighting)
        policy_chosen, policy_rejected = self.sequence_logps(tokens)
        reference_chosen, reference_rejected = self.reference_logps(model, batch, reference)
        chosen_lengths, rejected_lengths = response_lengths(batch)
        weights = (wpo_weights(tokens.logps, tokens.log_sum_sq_probs, tokens.sequence_index,
                               tokens.num_pairs) if self.use_weighting else None)
        terms = preference_loss(
            self,
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            pair_weights=weights,
        )
        return {
            "losses": terms.losses,
            "chosen_rewards": terms.chosen_rewards,
            "rejected_rewards": terms.rejected_rewards,
            "policy_chosen_logps": policy_chosen.detach(),
            "policy_rejected_logps": policy_rejected.detach(),
            **{f"loss/{name}": values for name, values in terms.components.items()},
            **({} if weights is None else {"wpo_weights": weights}),
        }
