"""Errors raised by ifp-compile.

Every error names *what* was wrong and *where* (block, parameter, argument), so a
toolchain engineer never has to read a stack trace from deep inside torch. All of
them derive from :class:`IFPError` (a ``ValueError``), so callers can catch one type.
"""

from __future__ import annotations


class IFPError(ValueError):
    """Base class of every error ifp-compile raises on bad input."""


class NoFFNFoundError(IFPError):
    """The program contains no recognisable FFN block."""


class MaskError(IFPError):
    """A mask given to the masked program or to ``specialize`` is malformed."""


class InstructionError(IFPError):
    """An instruction cannot be turned into masks (no predictor, empty text, no tokenizer)."""


class ProgramError(IFPError):
    """The program is not something this pass can work on (wrong kind, already specialized...)."""
