"""Chat with a base model plus a DPO-trained LoRA adapter (multi-turn, streamed).

Interactive by default; `--prompt "..."` answers once and exits.
"""

from __future__ import annotations

import sys

from dpo_core.chat_config import ChatConfig
from dpo_core.cli import run_command
from dpo_core.config import build_parser


def main(argv: list[str] | None = None) -> int:
    """Exit status of a chat session; argv None means this process's own command line."""
    return run_command(_chat, argv)


def _chat(argv: list[str] | None) -> int:
    explicit = vars(build_parser(ChatConfig, __doc__).parse_args(argv))
    if explicit.get("demo"):
        from dpo_core.demo import CHAT_PRESETS

        explicit = {**CHAT_PRESETS, **explicit}
    config = ChatConfig(**explicit)
    config.validate()
    from dpo_core.model import (
        avoid_bitsandbytes,
        load_inference_model,
        load_tokenizer,
        resolve_dtype,
        resolve_quantization,
    )

    quantize = resolve_quantization(config.quantization)
    if argv is None and not quantize:
        avoid_bitsandbytes()
    from dpo_core.chat import ChatSession, interactive

    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    model = load_inference_model(
        config.base_model,
        None if config.no_adapter else config.adapter_path,
        dtype=resolve_dtype(config.dtype),
        quantize_4bit=quantize,
        trust_remote_code=config.trust_remote_code,
    )
    session = ChatSession(model, tokenizer, config)
    if config.prompt is not None:
        session.reply(config.prompt, stream=True)
        print()
        return 0
    interactive(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
