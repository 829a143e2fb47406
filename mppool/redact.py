"""Keep passwords out of what mppool shows: reprs, logs, stats and errors."""

from __future__ import annotations

import re
from typing import Any

from psycopg.conninfo import conninfo_to_dict

MASK = "***"


def password_of(conninfo: str, kwargs: dict[str, Any] | None = None) -> str | None:
    """The password a conninfo string (or URI) and keyword arguments carry, if any."""
    if kwargs and kwargs.get("password"):
        return str(kwargs["password"])
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        # Unparsable, yet libpq may quote the faulty part in its error: the password.
        match = _URI_PASSWORD.match(conninfo) or _KEYWORD_PASSWORD.search(conninfo)
        if match is None:
            return None
        return match.group(1).strip("'") or None
    pw = params.get("password")
    return str(pw) if pw else None


_URI_PASSWORD = re.compile(r"\s*postgres(?:ql)?://[^:@/?#]*:([^@/?#]+)@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('[^']*'?|\S+)")


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every occurrence of each secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def safe_conninfo(conninfo: str) -> str:
    """A conninfo string with its password masked, for messages."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return "<unparsable conninfo>"
    if "password" in params:
        params["password"] = MASK
    return " ".join(f"{k}={v}" for k, v in params.items())
