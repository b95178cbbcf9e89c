"""How the kernels read their environment switches, in one place.

A default-on switch is off for 0, off, false or no (any case, surrounding spaces ignored), exactly as the CUDA
extension's ``env_off`` reads it (csrc/launch.cuh), so Python and C++ never disagree on a value. A tri-state switch
(``env_switch``: unset, on, off) forces a choice that a rule makes otherwise."""

from __future__ import annotations

import os
from typing import Optional

OFF_VALUES = ("0", "off", "false", "no")


def env_off(name: str) -> bool:
    """Whether environment variable ``name`` turns a default-on switch off."""
    return os.environ.get(name, "").strip().lower() in OFF_VALUES


def env_switch(name: str) -> Optional[bool]:
    """A tri-state environment variable: None unset or empty, True for 1 / true / on / yes, False for anything else."""
    text = os.environ.get(name, "").strip().lower()
    return None if text == "" else text in ("1", "true", "on", "yes")
