"""What trl's other DPO options cost per micro-batch: --ld_alpha, --use_weighting,
--sync_ref_model's reference adapter, --activation_offloading's hooks.

One LoRA policy (all linear layers) with a reference adapter, the run's default forward path
for its attention (`choose_forward`), UltraFeedback-shaped micro-batches
(`benchmarks/synthetic.py`); each option times `PreferenceObjective` (policy forward, reference
pass, loss) plus the backward pass over every micro-batch. Rounds are interleaved and reported
as medians of this process's CPU time (user + system), with the 1-minute load average: on a
shared machine CPU time is disturbed far less than wall time. The sync itself (one
`ReferenceSync` call) is timed apart. On a CPU, --activation_offloading moves nothing (the
activations are in host memory already): its row is the cost of the hooks alone.

    python -m benchmarks.trl_options --preset cpu-small --batches 4 --rounds 5 --threads 1
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.attention_options import (
    interleaved_rounds,
    preset_model,
    realistic_batches,
    timing_parser,
)
from benchmarks.synthetic import LORA_ALPHA, LORA_R
from dpo_core.config.train import TrainConfig
from dpo_core.forward.strategy import choose_forward
from dpo_core.modeling.adapters import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    add_lora,
    add_reference_adapter,
)
from dpo_core.modeling.reference import AdapterSwitched, adapter_disabled, reference_sync
from dpo_core.training.objective import PreferenceObjective


def main(argv: list[str] | None = None) -> int:
    args = timing_parser(__doc__.split("\n\n")[0], batches=4).parse_args(argv)
    torch.set_num_threads(args.threads)
    base, max_length, batch_size = preset_model(args.preset)
    model = add_reference_adapter(add_lora(base, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0,
                                           target_modules="all-linear",
                                           gradient_checkpointing=False, quantized=False))
    forward = choose_forward(model)
    forward.prepare(model)
    batches = realistic_batches(base.config.vocab_size, max_length, batch_size, args.batches,
                                collate=forward.collator(pad_token_id=0))
    moving = AdapterSwitched(reference=REFERENCE_ADAPTER, policy=POLICY_ADAPTER)
    options = {
        "DPO (reference: adapter off)": (PreferenceObjective(), adapter_disabled),
        "--ld_alpha 0.5": (PreferenceObjective(ld_alpha=0.5), adapter_disabled),
        "--use_weighting": (PreferenceObjective(use_weighting=True), adapter_disabled),
        "--sync_ref_model (reference adapter)": (PreferenceObjective(), moving),
        "--activation_offloading (CPU: hooks)": (
            PreferenceObjective(activation_offloading=True), adapter_disabled),
    }
    for objective, _ in options.values():
        objective.token_logps_fn = forward.token_logps
    print(f"{args.preset}: {args.batches} micro-batches of {batch_size} pairs, forward "
          f"{forward.token_logps.__name__}")

    def step(name: str) -> float:
        objective, reference = options[name]
        started = time.process_time()
        for batch in batches:
            objective(model, batch, reference)["losses"].sum().backward()
        model.zero_grad(set_to_none=True)
        return time.process_time() - started

    times, loads = interleaved_rounds(step, list(options), args.rounds)
    base_time = statistics.median(times["DPO (reference: adapter off)"])
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:38s} median {median:.3f} CPU s  (x{median / base_time:.3f} of DPO)  "
              f"runs {', '.join(f'{t:.3f}' for t in runs)}")
    sync = reference_sync(TrainConfig(sync_ref_model=True), model, moving)
    started = time.process_time()
    for _ in range(100):
        sync()
    print(f"one --sync_ref_model update of {len(sync.weights)} LoRA factors: "
          f"{(time.process_time() - started) * 10:.3f} CPU ms")
    print(f"1-minute load average after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
