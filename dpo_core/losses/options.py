"""The loss options and the table of losses: names, what each needs, and the checks. Torch-free.

`LOSSES` is the one table of the package's preference losses: name -> `LossKind` (the function
that computes it in `dpo_core.losses.functions`, whether it compares against a reference model,
which options enter its formula, a one-line summary). `--help`, the checks below and the
dispatch in `dpo_core.losses.preference` are all read off it, so adding a loss is one function,
one row here, one test (tests/losses) and one row of docs/losses.md.

`LossSettings` holds every loss option under its command-line name; `TrainConfig` inherits
them, so each is declared once. The options are checked when the settings are built
(`LossSettings(...)` raises `ConfigError` naming the flag); `validate_loss_options` adds the
checks that need the rest of a run's settings (a reference model or none).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from dpo_core.errors import ConfigError
from dpo_core.setting import setting

LOSS = "loss"  # the --help group of these options

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
NLL_NORMALIZATIONS = ("tokens", "pairs")

# How a loss relates to the reference model.
USES_REFERENCE = "uses"  # compares log-ratios log pi - log pi_ref (uniform with --reference_free)
NO_REFERENCE = "none"  # needs none; mixes with any loss (a given reference only shapes rewards)
NEVER_REFERENCE = "never"  # defined without one: passing reference log-probs is an error


@dataclass(frozen=True)
class LossKind:
    """One row of `LOSSES`."""

    function: str  # its function in dpo_core.losses.functions
    summary: str  # for --help
    reference: str = USES_REFERENCE
    label_smoothing: bool = False  # --label_smoothing enters its formula
    f_divergence: bool = False  # --f_divergence_type applies (f-DPO)
    nll: bool = False  # has a chosen-NLL term (which --ld_alpha must not reweigh)
    sorted_batch: bool = False  # its terms belong to quantiles, not pairs (no --use_weighting)
    fixed: Mapping[str, object] = dataclasses.field(default_factory=dict)  # fixed arguments


LOSSES: dict[str, LossKind] = {
    "sigmoid": LossKind("dpo_loss", "DPO; cDPO with --label_smoothing", label_smoothing=True,
                        f_divergence=True),
    "robust": LossKind("robust_loss", "robust DPO for --label_smoothing noisy labels",
                       label_smoothing=True, f_divergence=True),
    "ipo": LossKind("ipo_loss", "IPO, squared and length-normalised", f_divergence=True),
    "hinge": LossKind("hinge_loss", "SLiC hinge", f_divergence=True),
    "rpo": LossKind("rpo_loss", "DPO + --rpo_alpha NLL of chosen", label_smoothing=True,
                    f_divergence=True, nll=True),
    "exo_pair": LossKind("exo_pair_loss", "EXO; needs --label_smoothing > 0",
                         label_smoothing=True, f_divergence=True),
    "nca_pair": LossKind("nca_pair_loss", "NCA"),
    "bco_pair": LossKind("bco_pair_loss", "BCO"),
    "sppo_hard": LossKind("sppo_hard_loss", "SPPO, hard labels"),
    "aot": LossKind("aot_loss", "AOT, sorted within the micro-batch", label_smoothing=True,
                    sorted_batch=True, fixed={"paired": True}),
    "aot_unpaired": LossKind("aot_loss", "AOT, unpaired", label_smoothing=True,
                             sorted_batch=True, fixed={"paired": False}),
    "apo_zero": LossKind("apo_loss", "APO, chosen better than the model",
                         fixed={"anchor": "zero"}),
    "apo_down": LossKind("apo_loss", "APO, chosen worse than the model",
                         fixed={"anchor": "down"}),
    "discopop": LossKind("discopop_loss", "DiscoPOP, --discopop_tau", f_divergence=True),
    "sigmoid_norm": LossKind("sigmoid_norm_loss", "length-normalised DPO", f_divergence=True),
    "simpo": LossKind("simpo_loss", "SimPO, --simpo_gamma", reference=NEVER_REFERENCE),
    "orpo": LossKind("orpo_loss", "ORPO, --orpo_alpha", reference=NEVER_REFERENCE, nll=True),
    "cpo": LossKind("cpo_loss", "CPO, --cpo_alpha", reference=NEVER_REFERENCE,
                    label_smoothing=True, nll=True),
    "sft": LossKind("sft_loss", "the NLL term alone", reference=NO_REFERENCE,
                    f_divergence=True, nll=True),
}
LOSS_TYPES = tuple(LOSSES)
# Defined without a reference model: they never take one.
REFERENCE_FREE_LOSSES = tuple(n for n, k in LOSSES.items() if k.reference == NEVER_REFERENCE)


def _names_with(capability: str) -> tuple[str, ...]:
    return tuple(name for name, kind in LOSSES.items() if getattr(kind, capability))


def loss_type_help() -> str:
    """--loss_type's help text, from the table."""
    def listed(names):
        return ", ".join(f"{name} ({LOSSES[name].summary})" for name in names)

    with_reference = [n for n, k in LOSSES.items() if k.reference == USES_REFERENCE]
    without = [n for n, k in LOSSES.items() if k.reference != USES_REFERENCE]
    return ("Preference loss, trl's names; several comma-separated make a weighted mixture "
            f"(e.g. sigmoid,bco_pair,sft). With a reference: {listed(with_reference)}. Without "
            f"one: {listed(without)}. docs/losses.md gives each one's formula, reward and "
            "step-1 value.")


def _listed(value: str | list | tuple) -> list:
    """A comma-separated flag value as a list; a list (trl's form, e.g. from a config file)
    as it is."""
    return value.split(",") if isinstance(value, str) else list(value)


@dataclass
class LossSettings:
    """Every loss option, under its command-line name (``train.py --help`` explains each).

    ``loss_type`` is one name of ``LOSSES`` or a comma-separated mixture
    ("sigmoid,bco_pair,sft"), weighted by ``loss_weights`` ("0.8,0.2,1.0"; default all 1).
    Lists, as trl's ``DPOConfig`` takes them, work as well. Checked when built: a setting that
    makes no sense raises ``ConfigError`` naming its flag.
    """

    beta: float = setting(
        0.1, "DPO temperature: strength of the KL pull toward the reference.", LOSS)
    loss_type: str = setting("sigmoid", loss_type_help(), LOSS)
    loss_weights: str | None = setting(
        None, "Comma-separated weight per --loss_type, e.g. 0.8,0.2,1.0 (MPO); default all 1.",
        LOSS)
    label_smoothing: float = setting(
        0.0,
        "Assumed label-noise rate eps in [0, 0.5): conservative DPO (sigmoid, rpo, cpo; trl's "
        "sigmoid has none), robust DPO, aot, aot_unpaired; exo_pair's eps (needs > 0, paper: "
        "1e-3).",
        LOSS)
    rpo_alpha: float = setting(
        1.0, "Weight of the chosen-response NLL term for --loss_type rpo.", LOSS)
    simpo_gamma: float = setting(
        0.5, "Target reward margin for --loss_type simpo (the paper's gamma, as trl's).", LOSS)
    discopop_tau: float = setting(
        0.05, "Temperature of --loss_type discopop's blend (trl's and the paper's default).",
        LOSS)
    f_divergence_type: str = setting(
        "reverse_kl",
        "f-DPO: the divergence from the reference (reverse_kl = DPO). Applies to "
        f"{', '.join(_names_with('f_divergence'))}.",
        LOSS,
        choices=F_DIVERGENCE_TYPES)
    f_alpha_divergence_coef: float = setting(
        0.5, "alpha of --f_divergence_type alpha_divergence (1 = reverse_kl).", LOSS)
    nll_normalization: str = setting(
        "tokens",
        "The NLL term of sft, rpo, cpo and orpo: 'tokens' averages over every chosen token of "
        "the micro-batch (trl); 'pairs' averages each pair's per-token NLL over the pairs.",
        LOSS,
        choices=NLL_NORMALIZATIONS)
    orpo_alpha: float = setting(
        0.1,
        "Weight lambda of ORPO's odds-ratio term (trl's ORPOConfig.beta); --loss_type orpo.",
        LOSS)
    cpo_alpha: float = setting(
        1.0, "Weight of CPO's NLL (behaviour cloning) term for --loss_type cpo, as trl.", LOSS)
    ld_alpha: float | None = setting(
        None,
        "LD-DPO (arXiv 2409.06411), trl's name: each response's log-prob, policy and reference, "
        "is the sum over the tokens both replies have in length plus ld_alpha times the sum "
        "over the longer reply's tail; in [0, 1] (1 = plain DPO). Unset: off. Not with a loss "
        "that has an NLL term (sft, rpo, cpo, orpo).",
        LOSS)
    use_weighting: bool = setting(
        False,
        "WPO (arXiv 2406.11827), trl's name: weigh each pair's loss by w_chosen * w_rejected, "
        "w = exp(mean over the response of log p(token) - log sum_v p_v^2) under the policy, "
        "detached. Not with aot or aot_unpaired (their terms are quantiles, not pairs).",
        LOSS)

    def __post_init__(self) -> None:
        self.check_loss_options()

    def check_loss_options(self) -> None:
        """``ConfigError`` naming the flag of an option that makes no sense, or of options that
        do not go together."""
        _check_options(self)

    @property
    def loss_types(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in _listed(self.loss_type))

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type; ``ConfigError`` naming --loss_weights if it is no list of
        numbers."""
        if self.loss_weights is None:
            return (1.0,) * len(self.loss_types)
        try:
            return tuple(float(w) for w in _listed(self.loss_weights))
        except (TypeError, ValueError):
            raise ConfigError(f"--loss_weights {self.loss_weights!r} is not a comma-separated "
                              "list of numbers") from None

    @property
    def needs_reference(self) -> bool:
        """Whether any loss of the mixture compares against a reference model."""
        return any(LOSSES[name].reference == USES_REFERENCE for name in self.loss_types)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite_at_least(value: float, low: float, flag: str, strict: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    _check(ok, f"{flag} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")


def _check_options(settings: LossSettings) -> None:
    """The checks of the loss options among themselves (run when they are built)."""
    names = settings.loss_types
    for name in names:
        _check(name in LOSSES,
               f"unknown --loss_type {name!r}; choose one of {', '.join(LOSSES)} (or a "
               "comma-separated mixture of them)")
    _check(len(set(names)) == len(names), f"--loss_type {settings.loss_type} names a loss twice")
    weights = settings.weights
    _check(len(weights) == len(names),
           f"--loss_weights gives {len(weights)} weights for {len(names)} loss types "
           f"({', '.join(names)}): give one weight per --loss_type")
    for weight in weights:
        _finite_at_least(weight, 0.0, "each of --loss_weights")
    _finite_at_least(settings.beta, 0.0, "--beta", strict=True)
    eps = settings.label_smoothing
    _check(math.isfinite(eps) and 0.0 <= eps < 0.5,
           f"--label_smoothing must be in [0, 0.5), got {eps}")
    smoothed = _names_with("label_smoothing")
    _check(eps == 0 or any(n in smoothed for n in names),
           f"--label_smoothing {eps} has no effect with --loss_type {settings.loss_type}; it "
           f"applies to {', '.join(smoothed)}")
    _check(eps > 0 or "exo_pair" not in names,
           "--loss_type exo_pair needs --label_smoothing > 0 (its eps; the EXO paper suggests "
           "1e-3)")
    _finite_at_least(settings.rpo_alpha, 0.0, "--rpo_alpha")
    _finite_at_least(settings.simpo_gamma, 0.0, "--simpo_gamma")
    _finite_at_least(settings.discopop_tau, 0.0, "--discopop_tau", strict=True)
    _finite_at_least(settings.orpo_alpha, 0.0, "--orpo_alpha")
    _finite_at_least(settings.cpo_alpha, 0.0, "--cpo_alpha")
    _check(math.isfinite(settings.f_alpha_divergence_coef),
           f"--f_alpha_divergence_coef must be finite, got {settings.f_alpha_divergence_coef}")
    _check(settings.nll_normalization in NLL_NORMALIZATIONS,
           f"unknown --nll_normalization {settings.nll_normalization!r}; choose one of "
           f"{', '.join(NLL_NORMALIZATIONS)}")
    _check(settings.f_divergence_type in F_DIVERGENCE_TYPES,
           f"unknown --f_divergence_type {settings.f_divergence_type!r}; choose one of "
           f"{', '.join(F_DIVERGENCE_TYPES)}")
    unsupported = [n for n in names if not LOSSES[n].f_divergence]
    _check(settings.f_divergence_type == "reverse_kl" or not unsupported,
           f"--f_divergence_type {settings.f_divergence_type} does not apply to --loss_type "
           f"{', '.join(unsupported)}; it applies to {', '.join(_names_with('f_divergence'))}")
    if settings.ld_alpha is not None:
        _check(math.isfinite(settings.ld_alpha) and 0.0 <= settings.ld_alpha <= 1.0,
               f"--ld_alpha must be in [0, 1] (1 = plain DPO), got {settings.ld_alpha}")
        with_nll = [n for n in names if LOSSES[n].nll]
        _check(not with_nll,
               f"--ld_alpha does not apply to --loss_type {', '.join(with_nll)}: it would reweigh "
               "the tokens of its NLL term, which is no likelihood then. Drop --ld_alpha, or "
               "the loss with the NLL term")
    quantiles = [n for n in names if LOSSES[n].sorted_batch]
    _check(not (settings.use_weighting and quantiles),
           f"--use_weighting weighs each pair's loss, and --loss_type {', '.join(quantiles)} "
           "sorts the batch, so its terms belong to quantiles, not pairs (trl refuses it too): "
           "drop one of them")


def validate_loss_options(
    settings: LossSettings,
    *,
    reference_free: bool,
    precompute_ref_log_probs: bool = False,
) -> None:
    """Raise ``ConfigError`` naming the option when the loss does not fit the run's reference.

    A reference-free loss (simpo, orpo, cpo) with ``reference_free`` is accepted (it never
    uses a reference); mixing one with a loss that does use a reference needs
    ``--reference_free`` (so that every term sees the same, uniform reference); asking for
    reference log-probs to be precomputed when none are used is an error. (The options among
    themselves were checked when ``settings`` was built.)
    """
    names = settings.loss_types
    free = [n for n in names if n in REFERENCE_FREE_LOSSES]
    _check(reference_free or not (free and settings.needs_reference),
           f"--loss_type {settings.loss_type} mixes the reference-free {', '.join(free)} with "
           "losses that use a reference model: add --reference_free (a uniform reference for "
           "every term) or drop one of them")
    if precompute_ref_log_probs:
        _check(settings.needs_reference, f"--loss_type {settings.loss_type} uses no reference "
               "model: drop --precompute_ref_log_probs")
        _check(not reference_free,
               "--reference_free uses no reference model: drop --precompute_ref_log_probs")
