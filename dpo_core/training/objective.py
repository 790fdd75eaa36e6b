"""One micro-batch through the policy and the reference, into per-pair losses and rewards; and
every pair of an evaluation through it (`evaluate_pairs`)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from dpo_core.data.tokenization import IGNORE_INDEX
from dpo_core.forward.logps import TokenLogps, TokenLogpsFn, concatenated_token_logps
from dpo_core.forward.offloading import ActivationOffload
from dpo_core.forward.router import router_logits_recorded
from dpo_core.losses.functions import length_desensitized_logps, wpo_weights
from dpo_core.losses.options import LossSettings
from dpo_core.losses.preference import preference_loss
from dpo_core.modeling.architecture import router_shape
from dpo_core.modeling.loading import base_model_of, eval_mode
from dpo_core.modeling.reference import ReferenceContext, adapter_disabled

# What `evaluate_pairs` keeps per pair beside the objective's statistics: the response lengths
# and, when the batches carry them, the precomputed reference log-probs.
PAIR_EXTRAS = ("chosen_lengths", "rejected_lengths", "reference_chosen_logps",
               "reference_rejected_logps")


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
    # Weight of a mixture-of-experts router's load-balancing loss (`forward.router`) in each
    # pair's loss, as trl adds it; 0: none.
    router_aux_loss_coef: float = 0.0

    @classmethod
    def from_config(cls, config: object, token_logps_fn: TokenLogpsFn) -> PreferenceObjective:
        """The loss options, --reference_free, --activation_offloading and
        --router_aux_loss_coef (unset counts as 0: the run resolves it from the model before)
        of a ``TrainConfig``, with ``token_logps_fn``."""
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(LossSettings)}
        return cls(**options, reference_free=config.reference_free,
                   token_logps_fn=token_logps_fn,
                   activation_offloading=config.activation_offloading,
                   router_aux_loss_coef=config.router_aux_loss_coef or 0.0)

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

    def logps(self, model: torch.nn.Module,
              batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) under `model` as the losses compare them: one forward by
        `token_logps_fn`, then `sequence_logps`."""
        return self.sequence_logps(self.token_logps_fn(model, batch))

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
            return self.logps(reference_model, batch)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 reference: ReferenceContext | None = None) -> dict:
        """Per-pair tensors [B]: `losses` (with grad), detached rewards and log-probs, for
        a mixture each unweighted term under `loss/<type>`, with --use_weighting the
        `wpo_weights`, and with a router loss its value under `loss/aux` (each pair's loss
        holds `router_aux_loss_coef` times it: summed over a step's pairs and divided by their
        number, trl's `loss + coef * aux_loss`)."""
        offload = (ActivationOffload(model) if self.activation_offloading and
                   torch.is_grad_enabled() else nullcontext())
        routing = router_logits_recorded() if self.router_aux_loss_coef else nullcontext()
        with offload, routing as routed:
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
        losses, components = terms.losses, dict(terms.components)
        if routed is not None:
            aux = routed.load_balancing_loss(*router_shape(base_model_of(model).config))
            losses = losses + self.router_aux_loss_coef * aux
            components["aux"] = aux.detach().expand_as(losses).contiguous()
        return {
            "losses": losses,
            "chosen_rewards": terms.chosen_rewards,
            "rejected_rewards": terms.rejected_rewards,
            "policy_chosen_logps": policy_chosen.detach(),
            "policy_rejected_logps": policy_rejected.detach(),
            **{f"loss/{name}": values for name, values in components.items()},
            **({} if weights is None else {"wpo_weights": weights}),
        }


@torch.no_grad()
def evaluate_pairs(objective: PreferenceObjective, model: torch.nn.Module, loader,
                   reference: ReferenceContext | None,
                   accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every pair of `loader` once through `objective`, in eval mode: per-pair tensors [N]
    gathered from every process (the duplicates that even out the last batches dropped), the
    objective's statistics (detached) plus `PAIR_EXTRAS`."""
    gathered = []
    with eval_mode(model):
        for batch in loader:
            stats = {k: v.detach() for k, v in objective(model, batch, reference).items()}
            stats["chosen_lengths"], stats["rejected_lengths"] = response_lengths(batch)
            stats.update({k: batch[k] for k in PAIR_EXTRAS if k in batch})
            gathered.append(accelerator.gather_for_metrics(stats))
    return {key: torch.cat([g[key] for g in gathered]) for key in gathered[0]}
