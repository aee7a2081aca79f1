"""The one exception the client raises for server-side and transport failures."""

from __future__ import annotations


class DartClientError(RuntimeError):
    """The server rejected a request, failed it, or could not be reached.

    ``str(err)`` is the server's own message; ``status`` is its status code
    (gRPC code name or HTTP status) when it sent one.
    """

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
