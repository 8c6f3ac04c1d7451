"""Throughput of lens-safety ``generate`` under an active ``add_direction`` vs plain HF ``generate``.

Usage: ``python bench/generation.py [--model smollm2] [--prompts 16] [--max-new-tokens 32] [--batch-size 16]``.
Both runs decode greedily on the same prompts and batches; the vanilla model is a separately loaded
``AutoModelForCausalLM`` (no bridge). Repeats are interleaved and the best of each side is kept. Prints tokens per second of each and
the ratio (target >= 0.8).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats; the best of each is kept"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from lens_safety import PromptSet, load_model
    from lens_safety.evaluation import generate
    from lens_safety.evaluation.generation import completion_length, end_of_sequence_ids
    from lens_safety.interventions import add_direction

    model = load_model(args.model, device=args.device)
    prompts = PromptSet.load("builtin:harmless").head(args.prompts)
    vanilla = (
        AutoModelForCausalLM.from_pretrained(str(model.hf_path), dtype=model.dtype).to(model.device).eval()
    )
    torch.manual_seed(0)
    vector = torch.randn(model.d_model) * 1e-3  # small: same work, nearly the same tokens
    eos = end_of_sequence_ids(model)

    def vanilla_run() -> tuple[int, float]:
        tokens, started = 0, time.perf_counter()
        for start in range(0, len(prompts), args.batch_size):
            batch = model.chat.encode(list(prompts.prompts[start : start + args.batch_size])).to(model.device)
            with torch.inference_mode():
                out = vanilla.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_k=None,
                    top_p=None,
                    pad_token_id=model.tokenizer.pad_token_id,
                    use_cache=True,
                )
            for row in out[:, batch.input_ids.shape[1] :].tolist():
                tokens += completion_length(row, eos)[0]
        return tokens, time.perf_counter() - started

    def ours_run() -> tuple[int, float]:
        started = time.perf_counter()
        with add_direction(model, vector, layer=model.n_layers // 2, coeff=1.0):
            gens = generate(model, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        return sum(gens.n_tokens), time.perf_counter() - started

    vanilla_run()  # warm-up both paths once
    ours_run()
    runs: dict[str, list[tuple[int, float]]] = {"vanilla": [], "ours": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        runs["vanilla"].append(vanilla_run())
        runs["ours"].append(ours_run())
    v_tokens, v_seconds = min(runs["vanilla"], key=lambda r: r[1])
    o_tokens, o_seconds = min(runs["ours"], key=lambda r: r[1])
    v_rate, o_rate = v_tokens / v_seconds, o_tokens / o_seconds  # tokens before EOS per second
    print(
        f"device {model.device}, {len(prompts)} prompts, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"best of {args.repeats} interleaved repeats"
    )
    print(f"HF generate (vanilla model):        {v_rate:8.1f} tokens/s ({v_seconds:.2f} s)")
    print(f"lens-safety generate + add_direction: {o_rate:8.1f} tokens/s ({o_seconds:.2f} s)")
    print(
        f"throughput ratio {o_rate / v_rate:.3f}, wall-time ratio {v_seconds / o_seconds:.3f} (target >= 0.8)"
    )


if __name__ == "__main__":
    main()
