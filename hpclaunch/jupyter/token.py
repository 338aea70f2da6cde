"""The notebook server's token: made here, handed to the job in a 0600 file, kept out of logs.

Jupyter prints ``?token=...`` instead of a token it did not generate, so the token we make
never appears in the job's output; :func:`redact` covers every other place text is shown.
"""

from __future__ import annotations

import secrets

from ..console import REDACTED, redact

__all__ = ["REDACTED", "new_token", "redact"]


def new_token() -> str:
    """A 256-bit random token in hex, the alphabet Jupyter's own generated tokens use."""
    return secrets.token_hex(32)
