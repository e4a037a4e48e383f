"""Deterministic filler text for the data tests (a small vocabulary keeps tiny tokenizers meaningful)."""
import random

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud light night code data model token window").split()


def random_text(rng: random.Random, n_words: int) -> str:
    """About `n_words` words in lines of 4-12 words, ending with a newline."""
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(4, 12):
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"
