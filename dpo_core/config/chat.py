"""chat.py's settings; kept apart from the chat code so that `chat.py --help` and flag
errors need no torch import."""

from __future__ import annotations

from dataclasses import dataclass

from dpo_core.config.fields import (
    CHAT_TEMPLATE_MODES,
    DTYPE_NAMES,
    QUANTIZATION_MODES,
    check_finite,
)
from dpo_core.errors import ConfigError
from dpo_core.setting import setting

MODEL, GEN, SESSION = "model", "generation", "session"


@dataclass
class ChatConfig:
    base_model: str = setting("TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                           "Hub id or local directory of the base model.", MODEL)
    adapter_path: str = setting("dpo_tinyllama_model",
                             "Directory holding the trained adapter (train.py's --output_dir).",
                             MODEL)
    quantization: str = setting("auto", "'auto' = 4-bit where CUDA is present; '4bit'; 'none'.",
                             MODEL, choices=QUANTIZATION_MODES)
    dtype: str = setting("auto", "bfloat16/float16 on GPU, float32 on CPU.", MODEL,
                      choices=DTYPE_NAMES)
    no_adapter: bool = setting(False, "Chat with the base model alone (for comparison).", MODEL)
    trust_remote_code: bool = setting(False, "Run modelling code shipped with the model.", MODEL)
    max_new_tokens: int = setting(250, "Longest reply, in tokens (>= 1).", GEN)
    temperature: float = setting(0.7, "Sampling temperature (0 = greedy; >= 0).", GEN)
    top_p: float = setting(0.9, "Nucleus sampling threshold, in (0, 1].", GEN)
    chat_template: str | None = setting(
        None, "'auto' (the tokenizer's chat template) or 'none' (plain text). Default: the "
        "setting the adapter was trained with (its training_config.json), else 'auto'.",
        SESSION, choices=CHAT_TEMPLATE_MODES)
    system: str | None = setting(None, "System message that starts the conversation.", SESSION)
    prompt: str | None = setting(None, "Answer this one message and exit (scriptable).", SESSION)
    demo: bool = setting(False, "The bundled demo model plus the adapter `train.py --demo` wrote.",
                      SESSION)
    debug: bool = setting(False, "Show the full traceback of an error (also DPO_DEBUG=1).", SESSION)

    def validate(self) -> None:
        """Raise ConfigError naming the flag for settings generation cannot use."""
        check_finite(self)
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
