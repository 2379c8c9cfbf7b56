"""TLS contexts, built the same way by the agent and by `check-config`, so a certificate, key or CA
file that does not load is found by either as one line naming its setting."""

from __future__ import annotations

import ssl
from typing import Any

from .errors import StartupError


def server_context(tls: Any) -> ssl.SSLContext:
    """SPOP over TLS (HAProxy's `server ... ssl verify required ca-file ...`); with a CA file the
    agent also requires HAProxy's client certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        with open(tls.cert_file, errors="replace") as pem:
            has_certificate = "-----BEGIN CERTIFICATE-----" in pem.read()
    except OSError as error:
        raise StartupError("listen.tls.cert_file", f"cannot read {tls.cert_file}: {error.strerror}") from None
    if not has_certificate:
        raise StartupError("listen.tls.cert_file", f"{tls.cert_file} holds no PEM certificate")
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as error:
        raise StartupError(
            "listen.tls.key_file", f"cannot load {tls.key_file} with {tls.cert_file}: {_reason(error)}"
        ) from None
    if tls.ca_file:
        context.load_verify_locations(_ca_file(tls.ca_file, "listen.tls.ca_file"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(target: Any) -> ssl.SSLContext:
    """An https target's context: its CA file, or the system's CAs; no verification if told so."""
    cafile = None if target.ca_file is None else _ca_file(target.ca_file, f"{target.config_key}.ca_file")
    context = ssl.create_default_context(cafile=cafile)
    if not target.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_contexts(config: Any) -> None:
    """Build every context the agent will, or raise StartupError naming the setting."""
    if config.listen.tls is not None:
        server_context(config.listen.tls)
    for target in config.targets:
        if target.scheme == "https":
            client_context(target)


def _ca_file(path: str, key: str) -> str:
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as error:
        raise StartupError(key, f"cannot load CA certificates from {path}: {_reason(error)}") from None
    return path


def _reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason.lower().replace("_", " ") if error.reason else str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
