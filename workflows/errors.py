"""The failures a command reports to its user, and the exit codes they map to (one CLI error path).

| exit | meaning |
| --- | --- |
| 0 | success |
| 1 | runtime failure: a server, the network, storage or a worker failed (`RuntimeFailure`, `OSError`) |
| 2 | bad input or configuration: the user has to change something (`UsageError`) |
| 130 | interrupted (Ctrl-C); what was finished is kept and a rerun resumes |

Anything else is a bug and keeps its traceback. Library errors that are the user's fault
(`lightbsr.images.ImageError`, `lightbsr.checkpoint.CheckpointError`) are re-raised as a
`UsageError` where a command meets them, so that catching a bare `ValueError` never hides a bug.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "RuntimeFailure", "UsageError"]


class UsageError(Exception):
    """Bad input or configuration; the message names the file or key and says what to change (exit 2)."""


class RuntimeFailure(Exception):
    """A failure outside the user's input: a server, the network, a worker (exit 1)."""
