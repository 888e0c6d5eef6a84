"""Where a warning of lopt's points: at the user's line, not lopt's."""

from __future__ import annotations

import os
import sys

import torch

# A call from user code reaches a warning through lopt's frames and, for an
# optimizer step, torch's hooks and no_grad wrappers, whose depth changes
# between torch versions: a fixed stacklevel would point inside either.
_INTERNAL = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first
    frame outside ``lopt`` and ``torch``, counted from the function calling
    this one."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
