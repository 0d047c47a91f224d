"""What every state_dict reader shares: its errors and the rebuilt-tensor wrapper."""

from __future__ import annotations

_MAX_NDIM = 64
# A saved broadcast view (stride 0) is materialized; refuse absurd expansions.
_MAX_EXPANSION_BYTES = 1 << 30


class WeightsFileError(ValueError):
    """A weights file is missing parts, truncated, corrupt or of an unsupported kind."""

    def __init__(self, message, *, path=None):
        super().__init__(message)
        self.path = path


class UnsafeWeightsError(WeightsFileError):
    """The pickle inside a torch file references a global that is not needed for tensors.

    Raised before that global could be called; ``global_name`` is e.g. ``"posix.system"``.
    """

    def __init__(self, message, *, path=None, global_name=None):
        super().__init__(message, path=path)
        self.global_name = global_name


class _Corrupt(Exception):
    """Internal: raised inside the readers, re-raised as WeightsFileError with the path."""


class _Tensor:
    """Result of rebuilding one tensor; unwrapped to its ndarray at the end."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __setstate__(self, state):
        raise _Corrupt("malformed pickle: BUILD applied to a tensor")
