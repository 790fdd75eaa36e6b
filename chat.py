"""Chat with a base model plus a DPO-trained LoRA adapter (multi-turn, streamed).

Interactive by default; `--prompt "..."` answers once and exits.
"""

from __future__ import annotations

import sys

from dpo_core.chat import ChatConfig, ChatSession, interactive
from dpo_core.config import build_parser
from dpo_core.model import (
    ModelLoadError,
    load_inference_model,
    load_tokenizer,
    resolve_dtype,
    resolve_quantization,
)


def main(argv: list[str] | None = None) -> int:
    explicit = vars(build_parser(ChatConfig, __doc__).parse_args(argv))
    if explicit.get("demo"):
        from dpo_core.demo import CHAT_PRESETS

        explicit = {**CHAT_PRESETS, **explicit}
    config = ChatConfig(**explicit)
    try:
        tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
        model = load_inference_model(
            config.base_model,
            None if config.no_adapter else config.adapter_path,
            dtype=resolve_dtype(config.dtype),
            quantize_4bit=resolve_quantization(config.quantization),
            trust_remote_code=config.trust_remote_code,
        )
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session = ChatSession(model, tokenizer, config)
    if config.prompt is not None:
        session.reply(config.prompt, stream=True)
        print()
        return 0
    interactive(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
