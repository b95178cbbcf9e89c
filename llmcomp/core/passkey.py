"""Synthetic passkey retrieval built from the bundled text (long-context eval, DuoAttention calibration).

A prompt of exactly ``length`` tokens: an instruction, filler text from the corpus with one sentence
stating a 5-digit pass key at a given depth, then the question "What is the pass key? The pass key is".
The answer is `` <key>``. Filler comes from the evaluation split for evaluation and from the
calibration split for calibration, at seeded offsets, so the two never share text.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from llmcomp.core.data import corpus, tokenize
from llmcomp.errors import UserError

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")  # the usual passkey-retrieval wording
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySample:
    prompt: torch.Tensor  # int64 [length]
    answer: str  # the key's digits
    depth: float  # fraction of the filler before the needle


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_samples(tokenizer, length: int, n: int, seed: int = 0, split: str = "eval",
                    source: str | None = None) -> list[PasskeySample]:
    """``n`` prompts of ``length`` tokens, needle depths spread evenly over (0, 1)."""
    text = corpus(source).eval if split == "eval" else corpus(source).calib
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = str(rng.randint(10000, 99999))
        intro, needle, question = _ids(tokenizer, INTRO), _ids(tokenizer, NEEDLE.format(key=key)), _ids(tokenizer, QUESTION)
        n_fill = length - len(intro) - len(needle) - len(question)
        if n_fill < 16:
            raise UserError(f"A passkey prompt needs more than {length} tokens; use a longer context.")
        start = rng.randrange(0, max(1, len(text) - n_fill * 8))
        filler = tokenize(tokenizer, text[start:], max_tokens=n_fill).tolist()
        if len(filler) < n_fill:
            raise UserError(f"The {split} text is too short for {length}-token passkey prompts.")
        depth = (i + 0.5) / n
        cut = int(depth * n_fill)
        ids = intro + filler[:cut] + needle + filler[cut:] + question
        out.append(PasskeySample(torch.tensor(ids, dtype=torch.long), key, depth))
    return out


def passkey_sequences(tokenizer, length: int, n: int, seed: int = 0, split: str = "calib"):
    """Prompt followed by its answer tokens, as int64 [length + answer] (for training-style passes)."""
    return [(torch.cat([s.prompt, torch.tensor(_ids(tokenizer, " " + s.answer))]), s.answer)
            for s in passkey_samples(tokenizer, length, n, seed, split)]


def answer_correct(text: str, answer: str) -> bool:
    """The first number in the generated text is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group(0) == answer
