"""Settings: what a command was asked to do, before anything heavy is imported.

- `train.py`: `TrainConfig` (the loss options inherited from `dpo_core.losses.options`);
- `chat.py`: `ChatConfig`;
- `evaluation.py`: `EvalConfig` (`dpo-eval`);
- `fields.py`: the command line and `--config` files built from those dataclasses.
"""
