"""`dpo-eval`: did DPO help? The trained model of a run against the model it started from.

- `run.py`: the run directory read (settings, run plan, trained weights), torch-free;
- `models.py`: its policy and reference loaded as the run's plan says, one model in memory;
- `inputs.py`: the pairs (the run's eval split or `--eval_dataset`) and prompts (`--prompts`);
- `pairs.py`: preference accuracy on pairs, before and after, the training log's metrics;
- `replies.py`: replies of both, their lengths, stops, repeats and the sequence KL estimate;
- `judges.py`: rule functions and reward models, win rates;
- `statistics.py`: the formulas (percentiles, Wilson interval, length-controlled win rate);
- `evaluator.py`: all of it in order, under one process or `accelerate launch`.

What it writes is drawn by `dpo_core.reporting.eval_report`; the command line is
`dpo_core.cli.eval_main` (`dpo-eval`, `python -m dpo_core.evaluate`).
"""
