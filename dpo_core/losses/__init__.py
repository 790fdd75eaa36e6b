"""Preference losses: pure functions of per-sequence log-probs.

- `options.py`: the options (`LossSettings`) and the table of losses (`LOSSES`), torch-free;
- `functions.py`: one function per loss, each tested against a float64 formula;
- `preference.py`: `preference_loss` (the loss or mixture the settings name, from the table)
  and `preference_metrics` (the trl-named batch metrics).
"""
