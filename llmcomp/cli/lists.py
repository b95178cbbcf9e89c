"""Comma-separated integer flags (``--ms 1,4,16``, ``--keep-layers 0,5``, ``--passkey-lengths 1024,2048``), read
one way: an empty item (``1,,2``, a trailing comma) or a repeated one is a mistake named in one line, not dropped
or merged quietly."""
from __future__ import annotations

from llmcomp.errors import UserError


def int_list(text: str, flag: str, example: str, allow_empty: bool = False) -> tuple[int, ...]:
    """``text``'s integers; ``''`` is none where ``allow_empty``, else a UserError as every malformed list is."""
    if not text.strip():
        if allow_empty:
            return ()
        raise UserError(f"{flag} is empty; give comma-separated integers, e.g. {example}.")
    items = [v.strip() for v in text.split(",")]
    if "" in items:
        raise UserError(f"{flag} {text!r} has an empty item; give comma-separated integers, e.g. {example}.")
    try:
        values = tuple(int(v) for v in items)
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, e.g. {example}; got {text!r}.") from None
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise UserError(f"{flag} {text!r} lists {twice} twice.")
    return values
