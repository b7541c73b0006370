"""One error hierarchy. Every error says what went wrong and what to do about it.

The CLI catches `OnnxportError`, prints `error: <message>` plus `hint: <hint>` on one line each
and exits with `exit_code`; tracebacks are shown only with `--debug`.
"""

from __future__ import annotations


class OnnxportError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InputError(OnnxportError):
    """The user's input (a path, a flag, a checkpoint) is wrong."""

    exit_code = 2


class CheckpointError(InputError):
    """The checkpoint folder is missing, incomplete, unsafe or inconsistent."""


class UnsupportedModelError(InputError):
    """No recipe for this model_type."""


class ExportError(OnnxportError):
    """torch.onnx failed, or the exported graph breaks a contract (names, weights, dims)."""

    exit_code = 3


class VerificationError(OnnxportError):
    """ONNX Runtime disagrees with PyTorch beyond the stated tolerance."""

    exit_code = 4


class BundleError(InputError):
    """The output folder / bundle is missing, already exists, or is malformed."""


class RuntimeInputError(InputError):
    """Wrong inputs given to the ONNX Runtime side (names, shapes, dtypes, lengths)."""
