"""What a run leaves for a person to look at; `dpo-report` (`dpo_core.cli`, also
`python -m dpo_core.reporting`) redraws and compares.

- `curves.py`: training_curves.png and the final-metrics table, from train_log.jsonl;
- `samples.py`: samples.md, replies before and after training side by side;
- `eval_report.py`: `dpo-eval`'s table, eval_samples.md and eval.png, from its eval.json;
- `trackers.py`: TensorBoard / wandb through Accelerate;
"""
