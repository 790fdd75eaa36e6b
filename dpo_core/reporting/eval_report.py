"""What `dpo-eval` leaves for a person to look at, drawn from its result alone (what eval.json
holds), so `dpo-report` shows the same from the file:

- `format_eval_table`: the terminal table;
- `format_eval_samples`: eval_samples.md, reference and policy replies side by side, with the
  judges' scores;
- `plot_eval`: eval.png, reply lengths and judge scores before vs after, and the win rates.
"""

from __future__ import annotations

import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpo_core.errors import ReportError
from dpo_core.reporting.samples import markdown_cell, prompt_cell
from dpo_core.run_files import EVAL_FILE, EVAL_PLOT_FILE, EVAL_SAMPLES_FILE, write_json

# (label, key) of the pair metrics, and whether each is a share (shown as a percentage).
PAIR_ROWS = (
    ("log p(chosen) > log p(rejected)", "logps_accuracy", True),
    ("  per token (length-normalised)", "length_normalised_accuracy", True),
    ("implicit reward accuracy", "rewards/accuracies", True),
    ("implicit reward margin", "rewards/margins", False),
    ("loss", "loss", False),
    ("log p(chosen), mean", "logps/chosen", False),
    ("log p(rejected), mean", "logps/rejected", False),
)
REPLY_ROWS = (
    ("length in tokens, mean", "length_mean", False),
    ("length in tokens, median", "length_median", False),
    ("length in tokens, 90th percentile", "length_p90", False),
    ("stopped on their own", "stopped", True),
)


def write_eval_outputs(result: dict, directory: str) -> None:
    """eval.json, eval_samples.md and eval.png into `directory` (made if needed)."""
    os.makedirs(directory, exist_ok=True)
    write_json(directory, EVAL_FILE, result)
    with open(os.path.join(directory, EVAL_SAMPLES_FILE), "w") as f:
        f.write(format_eval_samples(result))
    plot_eval(result, os.path.join(directory, EVAL_PLOT_FILE))


def read_eval(directory: str) -> dict | None:
    """The eval.json `dpo-eval` wrote into `directory`, or None; ReportError if unreadable."""
    path = os.path.join(directory, EVAL_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None


def _value(value: float | None, share: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if share else f"{value:.4g}"


def _table(title: str, columns: tuple[str, str], rows: list[tuple[str, str, str]]) -> list[str]:
    width = max(len(title), *(len(label) for label, _, _ in rows))
    lines = [f"{title:<{width}}  {columns[0]:>10}  {columns[1]:>10}"]
    lines += [f"{label:<{width}}  {left:>10}  {right:>10}" for label, left, right in rows]
    return lines


def format_eval_table(result: dict) -> str:
    """The terminal table: pair metrics before/after, reply statistics reference/policy, and
    each judge's mean scores and win rates."""
    lines = [f"dpo-eval {result['run_dir']}: reference = {result['reference']}"]
    pairs = result.get("pairs")
    if pairs:
        before, after = pairs["before"], pairs["after"]
        rows = [(label, _value(before.get(key), share), _value(after.get(key), share))
                for label, key, share in PAIR_ROWS if key in after]
        lines += ["", *_table(f"Pairs: {pairs['source']} ({pairs['num_pairs']})",
                              ("before", "after"), rows)]
        lines.append("  (before training the policy is the reference: implicit rewards are 0)")
    generation = result.get("generation")
    if generation:
        reference, policy = generation["reference"], generation["policy"]
        repeat_key = next(k for k in policy if k.startswith("repeated_"))
        rows = [(label, _value(reference[key], share), _value(policy[key], share))
                for label, key, share in REPLY_ROWS]
        rows.append((repeat_key.replace("_", " "), _value(reference[repeat_key], True),
                     _value(policy[repeat_key], True)))
        rows.append(("KL estimate, log pi - log pi_ref", "", _value(generation["kl_estimate"],
                                                                    False)))
        lines += ["", f"Replies to {generation['num_prompts']} prompts of "
                      f"{generation['source']}: {generation['decoding']}, at most "
                      f"{generation['max_new_tokens']} new tokens",
                  *_table("", ("reference", "policy"), rows)]
    for name, judge in result.get("judges", {}).items():
        low, high = judge["win_rate_ci95"]
        lines += ["", *_table(f"Judge {name}", ("reference", "policy"), [
            ("mean score", _value(judge["reference_mean"], False),
             _value(judge["policy_mean"], False))])]
        lines.append(f"  policy wins {judge['wins']}, ties {judge['ties']}, loses "
                     f"{judge['losses']}: win rate {judge['win_rate']:.1%} (95% Wilson "
                     f"interval {low:.1%} to {high:.1%}), length-controlled "
                     f"{judge['lc_win_rate']:.1%}")
    return "\n".join(lines)


def format_eval_samples(result: dict) -> str:
    """eval_samples.md: one table row per prompt, reference and policy replies side by side,
    their lengths in tokens (and whether they were cut), log pi - log pi_ref, the scores."""
    samples = result["samples"]
    judges = list(result.get("judges", {}))
    generation = result.get("generation") or {}
    lines = [
        f"# dpo-eval samples: reference vs policy ({result['run_dir']})",
        "",
        f"Replies to {len(samples)} prompts of {generation.get('source', '-')}, "
        f"{generation.get('decoding', '-')}. Reference = {result['reference']}. Tokens: reply "
        "length (\"cut\": stopped at the token limit). Log-ratio: log pi - log pi_ref of the "
        "policy's reply.",
        "",
        "| # | prompt | reference reply | policy reply | tokens (ref / policy) | log-ratio |"
        + "".join(f" {markdown_cell(name)} (ref / policy) |" for name in judges),
        "| --- " * (6 + len(judges)) + "|",
    ]
    for number, sample in enumerate(samples, start=1):
        tokens = " / ".join(f"{sample[f'{who}_tokens']}"
                            + ("" if sample[f"{who}_stopped"] else " cut")
                            for who in ("reference", "policy"))
        scores = "".join(f" {sample['scores'][name]['reference']:.4g} / "
                         f"{sample['scores'][name]['policy']:.4g} |" for name in judges)
        lines.append(f"| {number} | {prompt_cell(sample['prompt'])} | "
                     f"{markdown_cell(sample['reference_reply'])} | "
                     f"{markdown_cell(sample['policy_reply'])} | {tokens} | "
                     f"{sample['log_ratio']:.4g} |{scores}")
    return "\n".join(lines) + "\n"


def plot_eval(result: dict, path: str) -> None:
    """eval.png: histograms of reply lengths and of each judge's scores, reference vs policy,
    bars of the win rates (with their 95% intervals and the length-controlled rates), and,
    with pairs, their accuracies before and after."""
    samples, judges = result["samples"], result.get("judges", {})
    panels = []
    if samples:
        panels.append(("reply length (tokens)", lambda axes: _histograms(
            axes, [s["reference_tokens"] for s in samples], [s["policy_tokens"] for s in samples])))
        for name in judges:
            panels.append((f"scores: {name}", lambda axes, name=name: _histograms(
                axes, [s["scores"][name]["reference"] for s in samples],
                [s["scores"][name]["policy"] for s in samples])))
    if judges:
        panels.append(("win rate of policy over reference", lambda axes: _win_rates(axes, judges)))
    if result.get("pairs"):
        panels.append(("held-out pairs", lambda axes: _pair_bars(axes, result["pairs"])))
    figure = Figure(figsize=(5 * max(1, len(panels)), 4.5))
    FigureCanvasAgg(figure)
    figure.suptitle(f"dpo-eval: {result['run_dir']}")
    grid = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for axes, (title, draw) in zip(grid, panels, strict=False):
        draw(axes)
        axes.set_title(title, fontsize="medium")
        axes.grid(alpha=0.3)
    if not panels:
        grid[0].text(0.5, 0.5, "nothing evaluated", ha="center", va="center")
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.82, wspace=0.3)
    figure.savefig(path, dpi=100)


def _histograms(axes, reference: list[float], policy: list[float]) -> None:
    low, high = min(reference + policy), max(reference + policy)
    if high == low:  # one value: one bar around it
        low, high = low - 0.5, high + 0.5
    axes.hist([reference, policy], bins=20, range=(low, high), label=["reference", "policy"])
    axes.legend(fontsize="small")


def _win_rates(axes, judges: dict[str, dict]) -> None:
    names = list(judges)
    rates = [judges[n]["win_rate"] for n in names]
    errors = [[rate - judges[n]["win_rate_ci95"][0] for n, rate in zip(names, rates, strict=True)],
              [judges[n]["win_rate_ci95"][1] - rate for n, rate in zip(names, rates, strict=True)]]
    positions = range(len(names))
    axes.bar(positions, rates, yerr=errors, capsize=6, label="win rate (95% interval)")
    axes.scatter(positions, [judges[n]["lc_win_rate"] for n in names], color="C1", zorder=3,
                 label="length-controlled")
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes.set_xticks(list(positions), [n.split(":")[-1] for n in names], fontsize="small")
    axes.set_ylim(0, 1)
    axes.legend(fontsize="small")


def _pair_bars(axes, pairs: dict) -> None:
    keys = ["logps_accuracy", "length_normalised_accuracy"]
    for offset, phase in ((-0.2, "before"), (0.2, "after")):
        values = [pairs[phase][key] for key in keys]
        bars = axes.bar([i + offset for i in range(len(keys))], values, width=0.4, label=phase)
        axes.bar_label(bars, fmt="%.2f", fontsize="small")
    axes.set_xticks(range(len(keys)), ["log p(chosen)\n> log p(rejected)", "per token"],
                    fontsize="small")
    axes.set_ylim(0, 1.1)
    axes.legend(fontsize="small")
