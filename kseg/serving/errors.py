"""Shared by every part of kseg serve: ServingError (a gRPC status code and message), the gRPC-code ->
HTTP-status table, TensorFlow runtime errors as ServingErrors, and DEFAULT_SIGNATURE."""

from __future__ import annotations

import re

DEFAULT_SIGNATURE = "serving_default"
# gRPC status code names -> HTTP status, as TF Serving's http_server.cc maps them.
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request failed: `code` is a gRPC status name (INVALID_ARGUMENT, NOT_FOUND, ...)."""

    def __init__(self, code, message, http_status=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


def _tf_error(e) -> ServingError:
    """A TensorFlow runtime error as a ServingError with TF's own status code and first message line."""
    import tensorflow as tf

    names = {getattr(tf.errors, n): n for n in HTTP_STATUS if isinstance(getattr(tf.errors, n, None), int)}
    code = names.get(getattr(e, "error_code", None), "INTERNAL")
    return ServingError(code, _first_line(getattr(e, "message", None) or str(e)) or type(e).__name__)


def _first_line(text):
    """The message of a TF error without its graph-execution preamble and node annotations."""
    skip = ("Graph execution error", "Detected at node", "<stack traces", "[[", "Traceback")
    lines = [ln.strip() for ln in str(text).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(skip)]
    line = (useful or [ln for ln in lines if ln] or [""])[0]
    return re.sub(r"\s*\[\[\{\{node .*$|\s*\[Op:\S+\]$", "", line)
