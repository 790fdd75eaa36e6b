"""Peak memory of the log-prob path against the model's own activations, counted exactly.

`PeakLiveBytes` counts the tensor storages allocated inside it and alive at once (tensors made
before, like the weights, are not counted), so CPU runs measure what a GPU allocator would hold.
For a vocabulary of 32000 (the `tinyllama` shape's) and 16 sequences of 1024 tokens on a small
model, forward + backward of:

- `activations`: the decoder alone, loss = a sum over its last hidden states;
- `padded`: `concatenated_forward` (two padded rows per pair);
- `padding-free`: `padding_free_forward` (one packed row);

and what each log-prob path holds above the activations, next to one fp32 logits chunk
(`logps.CHUNK_ELEMENTS`) and a full fp32 `[response tokens, vocab]` tensor.

    python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the mode and alive at once.

    Tensors that existed before (the logits themselves) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if (
                key in self.live
                or storage.nbytes() == 0
                or any(
                    key == a.untyped_storage().data_ptr()
                    for a in tree_flatten((args, kwargs))[0]
                    if isinstance(a, torch.Tensor)
                )
            ):
                continue  # a view or in-place result: no new memory
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def peak_bytes_of(step) -> int:
    tracker = PeakLiveBytes()
    with tracker:
        step()
    return tracker.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=768)
    args = parser.parse_args(argv)

    from dpo_core.data.batches import PreferenceCollator
    from dpo_core.data.tokenization import TokenizedPair
    from dpo_core.forward import logps
    from dpo_core.forward.attention import use_packed_attention
    from dpo_core.forward.packing import padding_free_forward
    from dpo_core.modeling.adapters import add_lora
    from dpo_core.testing import tiny_llama

    torch.manual_seed(0)
    model = add_lora(tiny_llama(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=2,
                                num_heads=4, attn_implementation="sdpa"),
                     r=16, alpha=32, dropout=0.0, target_modules="all-linear",
                     gradient_checkpointing=False, quantized=False)
    use_packed_attention(model.get_base_model())
    pairs = [TokenizedPair(*(torch.randint(3, args.vocab, (n,)).tolist()
                             for n in (args.prompt, args.response, args.response)))
             for _ in range(args.pairs)]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    decoder = model.get_base_model().model

    def activations() -> None:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        decoder(input_ids=ids).last_hidden_state.sum().backward()

    def path(forward):
        def run() -> None:
            chosen, rejected = forward(model, batch)
            (chosen.sum() - rejected.sum()).backward()
        return run

    response_tokens = 2 * args.pairs * args.response
    mib = 2**20
    chunk = logps.CHUNK_ELEMENTS * 4
    print(f"vocab {args.vocab}, hidden {args.hidden}, {2 * args.pairs} sequences x "
          f"{args.prompt + args.response} tokens, {response_tokens} response tokens")
    print(f"one fp32 logits chunk: {chunk / mib:.0f} MiB; a full fp32 [response tokens, vocab] "
          f"tensor: {response_tokens * args.vocab * 4 / mib:.0f} MiB")
    base = peak_bytes_of(activations)
    model.zero_grad(set_to_none=True)
    print(f"activations (decoder forward + backward): {base / mib:.0f} MiB")
    for name, forward in (("padded", logps.concatenated_forward),
                          ("padding-free", padding_free_forward)):
        peak = peak_bytes_of(path(forward))
        model.zero_grad(set_to_none=True)
        print(f"{name:13s} log-prob path: {peak / mib:.0f} MiB, {(peak - base) / mib:+.0f} MiB "
              f"above the activations ({(peak - base) / chunk:.2f} chunks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
