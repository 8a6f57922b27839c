"""Exceptions that carry their CLI exit code, so every layer can fail with the right code.

Exit codes (docs/exit-codes.md): 0 ok, 1 a gate failed, 2 bad input, 3 a stage failed at run time,
130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 3
EXIT_INTERRUPTED = 130


class FmapError(Exception):
    """Base class: a one-line message meant for the user, and the exit code it maps to."""

    exit_code = EXIT_STAGE_FAILED


class BadInput(FmapError):
    """The user gave something unusable: recipe, path, model, data, layer name. Exit 2."""

    exit_code = EXIT_BAD_INPUT


class StageFailed(FmapError):
    """A stage could not finish at run time (export mismatch, required backend missing). Exit 3."""

    exit_code = EXIT_STAGE_FAILED
