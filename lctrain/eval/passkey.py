"""`passkey`: the standard passkey retrieval test (Mohtashami & Jaggi, 2023).

A random 5-digit key is hidden at a uniformly random depth of repeated filler text ("The grass is green. The sky
is blue. ..."), followed by "What is the pass key? The pass key is"; the model decodes greedily through its
incremental path and is right when the first number it produces is the key. Prompts are built by
`lctrain.data.synthetic.PasskeyPrompts`, the same builder as the `passkey` training source, and have exactly the
requested number of tokens.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from lctrain.data.synthetic import PASSKEY_DIGITS, PasskeyPrompts, random_digits, rng_for
from lctrain.eval.retrieval import answer_prompts


def evaluate_passkey(model, tokenizer, lengths: list[int], trials: int = 20, seed: int = 0, batch_size: int = 4,
                     progress: bool = True) -> list[dict]:
    """One result per length: `{"length", "accuracy", "correct", "trials", "samples"}` (samples: the first few
    generations, for reading)."""
    prompts = PasskeyPrompts(tokenizer)
    max_new = len(prompts.answer_ids("9" * PASSKEY_DIGITS)) + 1
    results = []
    for length in tqdm(lengths, desc="passkey", unit="len", disable=not progress):
        rng = rng_for(seed, 3, length)
        keys = random_digits(rng, trials)
        depths = rng.random(trials)
        batch = [prompts.prompt(key, length, float(depth)) for key, depth in zip(keys, depths)]
        scored = answer_prompts(model, tokenizer, batch, keys, max_new, batch_size)
        correct = sum(s["correct"] for s in scored)
        for s, depth in zip(scored, depths):
            s["depth"] = round(float(depth), 3)
        results.append({"length": length, "accuracy": correct / trials, "correct": correct, "trials": trials,
                        "samples": scored[:3]})
    return results
