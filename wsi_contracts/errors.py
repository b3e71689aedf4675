"""Errors of the file contracts.

A :class:`UserError` is caused by the user's input or environment, never by a bug: the command-line
tools print it as one ``error:`` line and exit with its ``exit_code``. Contract errors are
``ValueError``s: the file exists but its content is not what the contract says.
"""

from __future__ import annotations

__all__ = ["UserError", "ContractError", "StoreError", "ShardError", "CheckpointError"]


class UserError(Exception):
    """An error caused by the user's input or environment (never a bug)."""

    exit_code = 2


class ContractError(UserError, ValueError):
    """A contract file (tile store, checkpoint) is missing, incomplete or not what its format says."""


class StoreError(ContractError):
    """A tile store is missing, incomplete, or inconsistent with the request."""


class ShardError(StoreError):
    """A tile shard of a store is missing, damaged or replaced (its recorded digest does not match)."""


class CheckpointError(ContractError):
    """A model checkpoint is missing, not safetensors, or lacks a required field."""
