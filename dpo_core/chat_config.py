"""chat.py's settings; kept apart from the chat code so that `chat.py --help` and flag
errors need no torch import."""

from __future__ import annotations

from dataclasses import dataclass

from dpo_core.config import (
    CHAT_TEMPLATE_MODES,
    DTYPE_NAMES,
    QUANTIZATION_MODES,
    ConfigError,
    _arg,
    check_finite,
)

MODEL, GEN, SESSION = "model", "generation", "session"


@dataclass
class ChatConfig:
    base_model: str = _arg("TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                           "Hub id or local directory of the base model.", MODEL)
    adapter_path: str = _arg("dpo_tinyllama_model",
                             "Directory holding the trained adapter (train.py's --output_dir).",
                             MODEL)
    quantization: str = _arg("auto", "'auto' = 4-bit where CUDA is present; '4bit'; 'none'.",
                             MODEL, choices=QUANTIZATION_MODES)
    dtype: str = _arg("auto", "bfloat16/float16 on GPU, float32 on CPU.", MODEL,
                      choices=DTYPE_NAMES)
    no_adapter: bool = _arg(False, "Chat with the base model alone (for comparison).", MODEL)
    trust_remote_code: bool = _arg(False, "Run modelling code shipped with the model.", MODEL)
    max_new_tokens: int = _arg(250, "Longest reply, in tokens (>= 1).", GEN)
    temperature: float = _arg(0.7, "Sampling temperature (0 = greedy; >= 0).", GEN)
    top_p: float = _arg(0.9, "Nucleus sampling threshold, in (0, 1].", GEN)
    chat_template: str | None = _arg(
        None, "'auto' (the tokenizer's chat template) or 'none' (plain text). Default: the "
        "setting the adapter was trained with (its training_config.json), else 'auto'.",
        SESSION, choices=CHAT_TEMPLATE_MODES)
    system: str | None = _arg(None, "System message that starts the conversation.", SESSION)
    prompt: str | None = _arg(None, "Answer this one message and exit (scriptable).", SESSION)
    demo: bool = _arg(False, "The bundled demo model plus the adapter `train.py --demo` wrote.",
                      SESSION)
    debug: bool = _arg(False, "Show the full traceback of an error (also DPO_DEBUG=1).", SESSION)

    def validate(self) -> None:
        """Raise ConfigError naming the flag for settings generation cannot use."""
        check_finite(self)
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
