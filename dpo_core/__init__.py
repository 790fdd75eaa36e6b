"""dpo_core: Direct Preference Optimization for Hugging Face causal LMs, without trl."""

__version__ = "0.1.0"
