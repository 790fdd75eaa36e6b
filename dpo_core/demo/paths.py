"""Where the demo's bundled assets live inside the installed package."""

from __future__ import annotations

from pathlib import Path

# Shipped as package data (setup.cfg: `dpo_core.demo = assets/model/*, assets/data/*`) and
# written by scripts/build_demo_assets.py.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def model_dir() -> Path:
    """The tiny base model and its tokenizer, in Hugging Face format (safetensors)."""
    return ASSETS_DIR / "model"


def train_file() -> Path:
    """Training preference pairs, JSONL rows of {"prompt", "chosen", "rejected"} strings."""
    return ASSETS_DIR / "data" / "train.jsonl"


def eval_file() -> Path:
    """Held-out pairs; no prompt here (nor its commuted twin) is in `train_file()`."""
    return ASSETS_DIR / "data" / "eval.jsonl"
