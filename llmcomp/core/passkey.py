"""Synthetic needle retrieval built from the bundled text (long-context eval, DuoAttention calibration).

- **Passkey**: a prompt of exactly ``length`` tokens: an instruction, filler text from the corpus with
  one sentence stating a 5-digit pass key at a given depth, then "What is the pass key? The pass key is".
- **Multi-key** (RULER's multi-key needle-in-a-haystack, built locally): ``keys`` needles "The pass key
  for <label> is <5 digits>." with distinct labels (colours, cities) and distinct keys at distinct
  depths; the question asks for one label's key, so the others are distractors.

The answer is `` <key>``. Needles and question are tokenized on their own and spliced between filler
tokens, so every prompt has exactly ``length`` tokens. Filler comes from the evaluation split for
evaluation and from the calibration split for calibration, at seeded offsets, so the two never share text.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from llmcomp.core.data import corpus, tokenize
from llmcomp.errors import UserError

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")  # the usual passkey-retrieval wording
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"

MULTI_INTRO = ("Several pass keys, each for a different name, are hidden inside a lot of irrelevant text. "
               "Find and memorize them. I will quiz you about one of them.\n\n")
MULTI_NEEDLE = "\nThe pass key for {label} is {key}.\n"
MULTI_QUESTION = "\n\nWhat is the pass key for {label}? The pass key for {label} is"
# Labels of the multi-key needles: words that do not occur in the Austen novels, no one a prefix of another.
LABELS = ("crimson", "turquoise", "magenta", "indigo", "amber", "teal", "ochre", "maroon", "beige", "cyan",
          "Tokyo", "Cairo", "Lima", "Oslo", "Vienna", "Madrid", "Kyoto", "Berlin", "Prague", "Athens", "Lisbon",
          "Sydney", "Toronto", "Nairobi", "Seoul", "Mumbai", "Havana", "Helsinki", "Warsaw", "Santiago")
MIN_FILLER = 16  # filler tokens a prompt must keep per needle


@dataclass
class PasskeySample:
    prompt: torch.Tensor  # int64 [length]
    answer: str  # the key's digits
    depth: float  # fraction of the filler before the (asked) needle
    label: str | None = None  # multi-key: the label asked about
    needles: dict[str, str] = field(default_factory=dict)  # multi-key: label → key of every needle


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _split_text(split: str, source: str | None) -> str:
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
    return corpus(source).eval if split == "eval" else corpus(source).calib


def _filler(tokenizer, text: str, n_fill: int, rng: random.Random, split: str, length: int) -> list[int]:
    """``n_fill`` tokens of ``text`` from a seeded offset."""
    start = rng.randrange(0, max(1, len(text) - n_fill * 8))
    filler = tokenize(tokenizer, text[start:], max_tokens=n_fill).tolist()
    if len(filler) < n_fill:
        raise UserError(f"The {split} text is too short for {length}-token passkey prompts.")
    return filler


def _splice(intro: list[int], filler: list[int], needles: list[tuple[int, list[int]]],
            question: list[int]) -> list[int]:
    """intro + filler with each needle's ids inserted before filler token ``cut`` + question."""
    ids, prev = list(intro), 0
    for cut, needle in sorted(needles, key=lambda x: x[0]):
        ids += filler[prev:cut] + needle
        prev = cut
    return ids + filler[prev:] + question


def _fill_budget(length: int, fixed: int, n_needles: int, what: str, hint: str) -> int:
    """The filler tokens a prompt of ``length`` holds beside its ``fixed`` ones; a UserError naming ``hint`` (the
    setting that gives the length) where fewer than MIN_FILLER a needle are left."""
    n_fill = length - fixed
    if n_fill < MIN_FILLER * n_needles:
        raise UserError(f"A {what} prompt of {length} tokens leaves {max(n_fill, 0)} tokens of filler text: its "
                        f"instructions, key{'s' if n_needles > 1 else ''} and question take {fixed}, and at least "
                        f"{MIN_FILLER * n_needles} filler tokens are needed, so at least "
                        f"{fixed + MIN_FILLER * n_needles} tokens; raise {hint}"
                        + (" or ask for fewer keys." if n_needles > 1 else "."))
    return n_fill


def passkey_samples(tokenizer, length: int, n: int, seed: int = 0, split: str = "eval",
                    source: str | None = None, hint: str = "the passkey lengths") -> list[PasskeySample]:
    """``n`` prompts of ``length`` tokens, needle depths spread evenly over (0, 1). ``hint``: the setting that gives
    ``length``, named where it is too short."""
    text = _split_text(split, source)
    rng = random.Random(seed)
    intro, question = _ids(tokenizer, INTRO), _ids(tokenizer, QUESTION)
    out = []
    for i in range(n):
        key = str(rng.randint(10000, 99999))
        needle = _ids(tokenizer, NEEDLE.format(key=key))
        n_fill = _fill_budget(length, len(intro) + len(needle) + len(question), 1, "passkey", hint)
        filler = _filler(tokenizer, text, n_fill, rng, split, length)
        depth = (i + 0.5) / n
        ids = _splice(intro, filler, [(int(depth * n_fill), needle)], question)
        out.append(PasskeySample(torch.tensor(ids, dtype=torch.long), key, depth))
    return out


def multikey_samples(tokenizer, length: int, n: int, keys: int = 4, seed: int = 0, split: str = "eval",
                     source: str | None = None, hint: str = "the passkey lengths") -> list[PasskeySample]:
    """``n`` multi-key prompts of ``length`` tokens with ``keys`` needles each. The asked needle's depth is
    spread evenly over (0, 1) across the samples; the other needles sit at seeded random depths."""
    if not isinstance(keys, int) or isinstance(keys, bool) or not 1 <= keys <= len(LABELS):
        raise UserError(f"The number of needle keys must be between 1 and {len(LABELS)}, got {keys!r}.")
    text = _split_text(split, source)
    rng = random.Random(f"multikey:{seed}:{keys}")
    intro = _ids(tokenizer, MULTI_INTRO)
    out = []
    for i in range(n):
        labels = rng.sample(LABELS, keys)
        values = [str(v) for v in rng.sample(range(10000, 100000), keys)]  # distinct keys
        asked = rng.randrange(keys)
        needles = [_ids(tokenizer, MULTI_NEEDLE.format(label=lab, key=val)) for lab, val in zip(labels, values)]
        question = _ids(tokenizer, MULTI_QUESTION.format(label=labels[asked]))
        n_fill = _fill_budget(length, len(intro) + sum(map(len, needles)) + len(question), keys,
                              f"{keys}-key needle", hint)
        filler = _filler(tokenizer, text, n_fill, rng, split, length)
        depth = (i + 0.5) / n
        cut = int(depth * n_fill)
        others = rng.sample([c for c in range(1, n_fill) if c != cut], keys - 1)  # distinct depths
        cuts = others[:asked] + [cut] + others[asked:]
        ids = _splice(intro, filler, list(zip(cuts, needles)), question)
        out.append(PasskeySample(torch.tensor(ids, dtype=torch.long), values[asked], depth, labels[asked],
                                 dict(zip(labels, values))))
    return out


def passkey_sequences(tokenizer, length: int, n: int, seed: int = 0, split: str = "calib",
                      hint: str = "the prompt length"):
    """Prompt followed by its answer tokens, as int64 [length + answer] (for training-style passes)."""
    return [(torch.cat([s.prompt, torch.tensor(_ids(tokenizer, " " + s.answer))]), s.answer)
            for s in passkey_samples(tokenizer, length, n, seed, split, hint=hint)]


def answer_correct(text: str, answer: str) -> bool:
    """The first number in the generated text is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group(0) == answer
