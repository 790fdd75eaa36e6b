"""`training_curves.png` and the final-metrics table, drawn from `train_log.jsonl`.

The curves: loss, reward accuracy, margins, rewards and log-probs (chosen and rejected) and the
learning rate over optimizer steps, train as lines, eval as markers (the trainer writes one
JSON record per logged step), plus before/after bars when the run made that evaluation.
`dpo-report` redraws them and compares runs.

Plots are drawn on a bare `Figure` with the Agg canvas, never through pyplot, so drawing
needs no display and leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dpo_core.errors import ReportError
from dpo_core.run_files import CURVES_FILE, LOG_FILE, METRICS_FILE, read_json

SPLITS = ("train", "eval")

# (panel title, metrics drawn on it): two metrics share a panel when they are read together.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("reward accuracy (chosen > rejected)", ("rewards/accuracies",)),
    ("reward margin (chosen - rejected)", ("rewards/margins",)),
    ("rewards", ("rewards/chosen", "rewards/rejected")),
    ("policy log-probs (summed over response)", ("logps/chosen", "logps/rejected")),
    ("learning rate", ("learning_rate",)),
)

# The metrics of the final-values table, in order (step counts come first).
TABLE_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                 "rewards/rejected", "logps/chosen", "logps/rejected")


# -- training curves --------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line of the plot: `metric` of `split` records of run `run`, by optimizer step."""

    run: str
    split: str
    metric: str
    steps: list[int]
    values: list[float]


def read_log(path: str) -> list[dict]:
    """The records of a train_log.jsonl; ReportError naming the file and line if one is bad."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ReportError(f"{path}, line {number}: not JSON ({error.msg})") from None
            well_formed = (isinstance(record, dict) and record.get("split") in SPLITS
                           and isinstance(record.get("step"), int))
            if not well_formed:
                raise ReportError(f"{path}, line {number}: a record needs an integer 'step' and "
                                  f"a 'split' of {' or '.join(SPLITS)}")
            records.append(record)
    return records


def metric_series(records: Sequence[dict], split: str,
                  metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in the `split` records that have it, in log order."""
    kept = [r for r in records if r["split"] == split and metric in r]
    return [r["step"] for r in kept], [r[metric] for r in kept]


def plot_runs(runs: dict[str, Sequence[dict]], path: str,
              before_after: dict[str, dict] | None = None) -> list[Series]:
    """Draw every run's train and eval records into one PNG at `path`; return what was drawn.

    `runs` maps a label (shown in the legends when there are several runs) to its records.
    Each (run, metric) gets its own colour; train is a line, eval is markers on a dashed line.
    `before_after` ({"before": {metric: value}, "after": {...}}, as the demo writes to
    metrics.json) adds a panel of bars, one pair per metric.
    """
    figure = Figure(figsize=(21 if before_after else 16, 8.5))
    FigureCanvasAgg(figure)
    # Fixed spacing for the fixed grid: an automatic layout engine doubles the drawing time.
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.9, wspace=0.22, hspace=0.35)
    figure.suptitle("DPO training: " + " vs ".join(runs))
    drawn: list[Series] = []
    grid = figure.subplots(2, 4 if before_after else 3).ravel()
    if before_after:
        _draw_before_after(grid[len(PANELS)], before_after)
        grid[len(PANELS) + 1].set_visible(False)
    for axes, (title, metrics) in zip(grid, PANELS, strict=False):
        colour = 0
        for run, records in runs.items():
            for metric in metrics:
                for split in SPLITS:
                    steps, values = metric_series(records, split, metric)
                    if not steps:
                        continue
                    label = " ".join(
                        ([run] if len(runs) > 1 else [])
                        + ([metric.split("/")[-1]] if len(metrics) > 1 else []) + [split])
                    style = {"linestyle": "--", "marker": "o"} if split == "eval" else \
                        {"linestyle": "-", "marker": "o" if len(steps) == 1 else None}
                    axes.plot(steps, values, color=f"C{colour}", label=label, **style)
                    drawn.append(Series(run, split, metric, steps, values))
                colour += 1
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metrics == ("rewards/accuracies",):
            axes.set_ylim(-0.05, 1.05)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no records", ha="center", va="center",
                      transform=axes.transAxes)
    figure.savefig(path, dpi=100)
    return drawn


def _draw_before_after(axes, before_after: dict[str, dict]) -> None:
    """Bars of each metric before and after training (metrics that are None are skipped)."""
    names = [name for name, value in before_after["after"].items()
             if isinstance(value, float) and isinstance(before_after["before"].get(name), float)]
    for offset, phase in ((-0.2, "before"), (0.2, "after")):
        values = [before_after[phase][name] for name in names]
        bars = axes.bar([i + offset for i in range(len(names))], values, width=0.4, label=phase)
        axes.bar_label(bars, fmt="%.2f", fontsize="small")
    axes.set_xticks(range(len(names)), [name.replace("_", "\n") for name in names],
                    fontsize="small")
    axes.set_ylim(0, 1.1)
    axes.set_title("held-out: before vs after")
    axes.legend(fontsize="small")


def run_labels(output_dirs: Sequence[str]) -> list[str]:
    """Directory names as run labels; whole paths where two names would be the same."""
    names = [os.path.basename(os.path.normpath(d)) for d in output_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in output_dirs]


def load_run(output_dir: str) -> list[dict]:
    """The records of the run in `output_dir`; ReportError if there are none to draw."""
    path = os.path.join(output_dir, LOG_FILE)
    if not os.path.isfile(path):
        raise ReportError(f"{output_dir}: no {LOG_FILE} here (is it a training --output_dir?)")
    records = read_log(path)
    if not records:
        raise ReportError(f"{path} holds no records yet")
    return records


def write_training_curves(output_dir: str) -> list[Series]:
    """Redraw output_dir/training_curves.png from output_dir/train_log.jsonl (panels say
    "no records" where nothing was logged)."""
    path = os.path.join(output_dir, LOG_FILE)
    records = read_log(path) if os.path.isfile(path) else []
    return plot_runs({run_labels([output_dir])[0]: records},
                     os.path.join(output_dir, CURVES_FILE), read_before_after(output_dir))


def read_before_after(output_dir: str) -> dict[str, dict] | None:
    """The before/after evaluation a run saved in metrics.json (the demo's), else None."""
    metrics = read_json(output_dir, METRICS_FILE)
    if metrics and "before" in metrics and "after" in metrics:
        return {"before": metrics["before"], "after": metrics["after"]}
    return None


def final_metrics(records: Sequence[dict]) -> dict[str, dict]:
    """The last record of each split ({} for a split never logged)."""
    last: dict[str, dict] = {split: {} for split in SPLITS}
    for record in records:
        last[record["split"]] = record
    return last


def format_final_metrics(runs: dict[str, Sequence[dict]],
                         plans: dict[str, dict | None] | None = None) -> str:
    """A plain-text table: one row per train/eval metric, one column per run; then, from
    each run's training_config.json, what its "auto" settings resolved to ("plan/...")."""
    finals = {run: final_metrics(records) for run, records in runs.items()}
    rows = [["metric", *runs]]
    for split in SPLITS:
        rows.append([f"{split} step", *(str(f[split].get("step", "-")) for f in finals.values())])
        for metric in TABLE_METRICS:
            rows.append([f"{split}/{metric}",
                         *(_number(f[split].get(metric)) for f in finals.values())])
    known = [plan for plan in (plans or {}).values() if plan]
    for name in dict.fromkeys(key for plan in known for key in plan):
        rows.append([f"plan/{name}", *(str((plans[run] or {}).get(name, "-")) for run in runs)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
