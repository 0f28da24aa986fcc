"""Typed adapter errors. Every message names the adapter path and says what to fix.

The server maps these to HTTP 4xx (they are the caller's fault: a bad directory, not a server bug).
"""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class: an adapter directory cannot be used with this base / these limits."""


class AdapterNotFoundError(AdapterError):
    """The directory or one of its required files does not exist."""


class UnsafeAdapterFormatError(AdapterError):
    """Weights are in a pickle-based format (.bin/.pt/.pkl); they are refused and never opened."""


class CorruptAdapterError(AdapterError):
    """A file exists but cannot be parsed: bad JSON, corrupt/truncated safetensors, NaN weights."""


class UnsupportedAdapterError(AdapterError):
    """Well-formed, but a type or option peftserve does not serve (unknown peft_type, task type, DoRA...)."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit the base: a target module the base lacks, or tensor shapes of another model."""


class AdapterLimitError(AdapterError):
    """The adapter exceeds a configured limit (rank, virtual tokens, file size)."""


class SlotError(AdapterError):
    """Misuse of the slot API: unknown kind, slot out of range, writing a merged slot, merge conflicts."""
