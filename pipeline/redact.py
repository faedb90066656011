"""Credential scrubbing for everything we write that a person may read or share.

Logs, the run manifest (``_run.json``) and error rows pass through here. Two layers:
- by name: values under secret-looking keys (``secret``, ``token``, ``password``, ...)
  in mappings such as fsspec ``storage_options`` are replaced;
- by value: the exact secret values found in the process environment (AWS, GCS, Azure
  variables) or passed in explicitly are replaced wherever they appear in text, plus
  generic shapes: URL user-info, signed-URL query parameters, ``key=value`` pairs with a
  secret-looking key, and AWS access key ids.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# Key names whose values are secrets. Matched case-insensitively anywhere in the key.
_SECRET_KEY = re.compile(
    r"(secret|passw|token|credential|private|signature|session|api_?key|access_?key|"
    r"account_?key|key_?id|sas|connection_?string|auth)",
    re.IGNORECASE,
)

# Environment variables whose values are secrets, as cloud SDKs and fsspec read them.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)

# Too-short values would mask ordinary words; real credentials are longer.
_MIN_SECRET_LEN = 6

_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@")
_KEY_VALUE = re.compile(
    r"(?P<key>[A-Za-z0-9_.-]*(?:secret|passw|token|credential|signature|api_?key|access_?key|"
    r"account_?key|key_?id)[A-Za-z0-9_.-]*|(?<![A-Za-z0-9_.-])sig)(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s'\",&;}]+)",
    re.IGNORECASE,
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}\b")


# Exact key names that are secrets but too generic to search for inside longer names
# (s3fs takes its access key id as ``key``; SAS URLs sign with ``sig``).
_SECRET_KEY_EXACT = frozenset({"key", "sig", "pwd", "pass"})


def is_secret_key(name: str) -> bool:
    """True when a mapping key names a credential (``key``, ``secret``, ``key_id``, ``token``, ...)."""
    name = str(name)
    return name.lower() in _SECRET_KEY_EXACT or bool(_SECRET_KEY.search(name))


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The credential values currently set in the environment (non-empty, long enough)."""
    environ = os.environ if environ is None else environ
    return [environ[name] for name in SECRET_ENV_VARS if len(environ.get(name) or "") >= _MIN_SECRET_LEN]


def secret_values(mapping: Any) -> list[str]:
    """Every string value under a secret-looking key, searched recursively (e.g. storage_options)."""
    found: list[str] = []

    def walk(node: Any, secret: bool) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, secret or is_secret_key(key))
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, secret)
        elif secret and isinstance(node, str) and len(node) >= _MIN_SECRET_LEN:
            found.append(node)

    walk(mapping, False)
    return found


def redact_text(text: Any, extra_secrets: Iterable[str] = ()) -> Any:
    """Return ``text`` with credentials masked; non-strings (e.g. None) come back unchanged."""
    if not isinstance(text, str) or not text:
        return text
    secrets = sorted(
        {s for s in [*env_secrets(), *extra_secrets] if isinstance(s, str) and len(s) >= _MIN_SECRET_LEN},
        key=len,
        reverse=True,  # longest first, so a secret containing another is masked whole
    )
    for secret in secrets:
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group('key')}{m.group('sep')}{MASK}", text)
    return _AWS_KEY_ID.sub(MASK, text)


def redact_mapping(mapping: Any, extra_secrets: Iterable[str] = ()) -> Any:
    """Deep copy of a JSON-like structure with secret-named values masked and strings scrubbed.

    Use on anything serialised for people: the run manifest, a config dump, storage options.
    """
    extra = [*extra_secrets, *secret_values(mapping)]

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {
                key: (MASK if is_secret_key(key) and node_value is not None else walk(node_value))
                for key, node_value in node.items()
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v) for v in node)
        if isinstance(node, str):
            return redact_text(node, extra)
        return node

    return walk(mapping)


class RedactingFilter(logging.Filter):
    """Logging filter that masks credentials in every record it sees.

    Attach to handlers (``handler.addFilter(RedactingFilter(secrets))``) so that messages,
    their arguments and tracebacks are scrubbed before they are formatted anywhere.
    """

    def __init__(self, extra_secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra_secrets = list(extra_secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage(), self.extra_secrets)
        record.args = None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(formatted, self.extra_secrets)
            record.exc_info = None
        return True


def install_log_redaction(extra_secrets: Iterable[str] = (), logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a RedactingFilter to every handler of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    flt = RedactingFilter(extra_secrets)
    for handler in target.handlers:
        handler.addFilter(flt)
    return flt
