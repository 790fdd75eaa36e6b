"""Data, as the pipeline runs: sources -> pairs -> token ids -> batches.

- `sources.py`: raw rows of a file, a save_to_disk directory or a Hub dataset;
- `pairs.py`: rows validated and normalised into `PreferencePair`s, sampled and split;
- `templates.py`: chat templates (rendering prompts, where replies end);
- `tokenization.py`: pairs into `TokenizedPair`s, truncated;
- `batches.py`: padded batches, and the epoch order;
- `training_data.py`: all of it for a run, from its `TrainConfig`.
"""
