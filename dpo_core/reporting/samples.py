"""samples.md: greedy replies to a few eval prompts, the model training started from (the
reference) next to the trained model, as a markdown table."""

from __future__ import annotations

import html
from collections.abc import Sequence


# -- samples ----------------------------------------------------------------------------------
def write_samples(path: str, prompts: Sequence[list[dict[str, str]] | str],
                  base: Sequence[str], trained: Sequence[str], *, use_chat_template: bool,
                  max_new_tokens: int) -> None:
    """samples.md at `path`: the replies of the model training started from (`base`) and of
    the trained model to `prompts`, as `format_samples` lays them out."""
    with open(path, "w") as f:
        f.write(format_samples(prompts, base, trained, use_chat_template=use_chat_template,
                               max_new_tokens=max_new_tokens))


def format_samples(prompts: Sequence[list[dict[str, str]] | str], base: Sequence[str],
                   trained: Sequence[str], *, use_chat_template: bool,
                   max_new_tokens: int) -> str:
    """samples.md: one table row per prompt, base and trained replies side by side."""
    lines = [
        "# Samples: base model vs trained model",
        "",
        f"Greedy replies (at most {max_new_tokens} new tokens) to the first {len(prompts)} "
        f"eval prompts, chat template {'on' if use_chat_template else 'off'} as in training. "
        "Base = the model training started from (the reference).",
        "",
        "| # | prompt | base model | trained model |",
        "| --- | --- | --- | --- |",
    ]
    for number, (prompt, before, after) in enumerate(zip(prompts, base, trained, strict=True),
                                                     start=1):
        lines.append(f"| {number} | {prompt_cell(prompt)} | {markdown_cell(before)} | "
                     f"{markdown_cell(after)} |")
    return "\n".join(lines) + "\n"


def prompt_cell(prompt: list[dict[str, str]] | str) -> str:
    """A prompt (text, or messages as "**role**: content" lines) in one table cell."""
    if isinstance(prompt, str):
        return markdown_cell(prompt)
    return "<br>".join(f"**{m['role']}**: {markdown_cell(m['content'])}" for m in prompt)


def markdown_cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, no column breaks, no raw HTML."""
    if not text.strip():
        return "*(empty)*"
    escaped = html.escape(text.strip(), quote=False).replace("|", "\\|")
    return "<br>".join(escaped.splitlines())
