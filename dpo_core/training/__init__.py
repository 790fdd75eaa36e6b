"""The training loop and what it keeps.

- `trainer.py`: `train` and `Trainer`, the loop over optimizer steps;
- `setup.py`: the run built in dependency order, one step a function;
- `plan.py`: what each "auto" setting resolved to;
- `objective.py`: a micro-batch into per-pair losses and rewards;
- `reference_logps.py`: reference log-probs computed once and cached;
- `checkpoint.py`: atomic, resumable checkpoints;
- `stops.py`: Ctrl-C, non-finite steps and out of memory: what stops a run and what it says;
- `schedule.py`, `metrics.py`, `host_memory.py`: the learning rate, the logged numbers, CPU
  memory reuse.
"""
