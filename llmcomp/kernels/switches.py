"""How the kernels read their environment switches, in one place.

A default-on switch is off for 0, off, false or no (any case, surrounding spaces ignored), exactly as the CUDA
extension's ``env_off`` reads it (csrc/launch.cuh), so Python and C++ never disagree on a value."""

from __future__ import annotations

import os

OFF_VALUES = ("0", "off", "false", "no")


def env_off(name: str) -> bool:
    """Whether environment variable ``name`` turns a default-on switch off."""
    return os.environ.get(name, "").strip().lower() in OFF_VALUES
