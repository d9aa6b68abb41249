"""What kind of location a string names, and how to show it safely: the one home for URL questions.

A location is a plain path, a `file://` URL, or a remote URL (`s3://`, `http(s)://`, `runs:/`,
`models:/` ...). `redact` drops the `user:password@` part of a URL; `redact_text` does the same for
every URL inside a message, so nothing that is logged, stored or printed carries a secret.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["is_remote", "is_s3", "join", "local_path", "redact", "redact_text"]

# scheme://user[:password]@host -> the userinfo part, wherever it appears in a text
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")


def is_remote(url: str) -> bool:
    """True for anything with a scheme other than `file` (s3://, http://, runs:/, models:/ ...)."""
    scheme = urlsplit(url).scheme
    return len(scheme) > 1 and scheme != "file"  # a one-letter "scheme" is a Windows drive


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def local_path(url: str) -> Path:
    """A plain path or `file://` URL -> an absolute path (`~` expanded)."""
    if is_remote(url):
        raise ValueError(f"{redact(url)} is not a local path")
    return Path(os.path.abspath(os.path.expanduser(url.removeprefix("file://"))))


def redact(url: str) -> str:
    """The URL without any user:password part, safe to log or store."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def redact_text(text: str) -> str:
    """`text` with the userinfo of every URL in it removed (for error messages and logs)."""
    return _USERINFO.sub(r"\g<scheme>", text)


def join(url: str, *parts: str) -> str:
    """`join("s3://b/p", "x", "y.png") -> "s3://b/p/x/y.png"`; local paths stay local paths."""
    if "://" in url:
        return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(url, *parts))
