"""What a failed OpenSSH login printed, as one of our errors with one line and a hint (pure).

``ssh`` says why it could not connect on stderr and exits 255; these are the messages of OpenSSH 9.x
that users meet (refused port, unknown or changed host key, refused keys, no Kerberos ticket).
"""

from __future__ import annotations

import re

from hpclaunch.errors import ConnectionFailed, HostKeyError
from hpclaunch.transport.hostkeys import ENV_ACCEPT_NEW

_FINGERPRINT = re.compile(r"(SHA256:[A-Za-z0-9+/=]+)")
_KEY_TYPE = re.compile(
    r"(?:The fingerprint for the|No) (\S+) (?:key sent by the remote host|host key is known)"
)
_METHODS = re.compile(r"Permission denied \(([^)]*)\)")


def _lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]


def login_failure(
    stderr: str,
    target: str,
    alias: str,
    config_name: str,
    keys: tuple[str, ...] = (),
    jump: str | None = None,
    *,
    gssapi: bool = False,
    ticket: bool | None = None,
) -> ConnectionFailed:
    """The error for a login that failed with ``stderr`` (``target``: ``user@host:port`` for messages;
    ``keys``: the identity files ssh could offer, named when the server refused them; ``gssapi``: the
    host's settings say GSSAPIAuthentication yes; ``ticket``: what ``klist -s`` said, None = unknown)."""
    text = stderr.replace("\r", "")
    lines = _lines(stderr)
    last = lines[-1] if lines else "ssh exited with 255 and said nothing"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        fp = _FINGERPRINT.search(text)
        kind = _KEY_TYPE.search(text)
        seen = f"{kind.group(1).lower() if kind else 'its key'} {fp.group(1) if fp else ''}".strip()
        return HostKeyError(
            f"the host key of {target} HAS CHANGED (now {seen}); refusing to connect",
            hint="if the admins replaced the key, remove the old one with `ssh-keygen -R HOST` "
            "and connect again; otherwise someone may be intercepting the connection",
        )
    if "Host key verification failed" in text or "host key is known" in text:
        return HostKeyError(
            f"the host key of {target} is not known (OpenSSH's strict checking refused it)",
            hint="check it with the admins, then connect once with --accept-new-host-key "
            f"(or {ENV_ACCEPT_NEW}=1) to record it; a changed key is always refused",
        )
    if jump and "kex_exchange_identification" in text:
        # The jump host's own "connect failed" is below LogLevel ERROR: this is what is left of it.
        return ConnectionFailed(
            f"cannot connect to {target} via jump host {jump}: the jump host could not reach it "
            "(or closed the connection)",
            hint=f"check HostName/Port of {alias} in {config_name}, as seen from {jump}",
        )
    if "Connection refused" in text:
        return ConnectionFailed(
            f"cannot connect to {target}: connection refused",
            hint=f"is sshd running? check HostName/Port of {alias} in {config_name}",
        )
    if "Could not resolve hostname" in text:
        return ConnectionFailed(
            f"cannot resolve the host of {target}", hint=f"check HostName of {alias} in {config_name}"
        )
    if "timed out" in text:
        return ConnectionFailed(
            f"cannot connect to {target}: {last}", hint="is the host reachable from here?"
        )
    methods = _METHODS.search(text)
    if methods:
        offered = [m.strip() for m in methods.group(1).split(",") if m.strip()]
        kerberos = _kerberos_failure(offered, target, alias, config_name, keys, gssapi, ticket)
        if kerberos is not None:
            return kerberos
        if "publickey" in offered and keys:
            refused = f"the server refused every key offered ({', '.join(keys)})"
        else:
            refused = f"the server refused every method ssh tried ({', '.join(offered) or 'none'})"
        hint = "is your key in ~/.ssh/authorized_keys there, or loaded in ssh-agent? "
        if gssapi and ticket is False and any(m.startswith("gssapi") for m in offered):
            # Keys and Kerberos both failed: the missing ticket may be the whole story.
            refused += "; and there is no Kerberos ticket (`klist` shows none)"
            hint = "if this host uses Kerberos, run `kinit` first; otherwise: " + hint
        return ConnectionFailed(
            f"cannot log in to {target}: {refused}", hint=hint + f"`ssh -v {alias}` shows what was tried"
        )
    return ConnectionFailed(f"cannot connect to {target}: {last}")


def _kerberos_failure(
    offered: list[str],
    target: str,
    alias: str,
    config_name: str,
    keys: tuple[str, ...],
    gssapi: bool,
    ticket: bool | None,
) -> ConnectionFailed | None:
    """The error when Kerberos is what failed: the server wants GSSAPI and there is no key to blame.

    Debian's /etc/ssh/ssh_config turns GSSAPIAuthentication on for every host, so the setting alone
    proves nothing: the server must offer ``gssapi-with-mic`` too, and no key of ours may be in play."""
    server_gssapi = any(m.startswith("gssapi") for m in offered)
    only_gssapi = bool(offered) and all(m.startswith("gssapi") for m in offered)
    if not server_gssapi or (keys and not only_gssapi):
        return None
    if not gssapi:
        if not only_gssapi:
            return None
        return ConnectionFailed(
            f"cannot log in to {target}: it accepts only Kerberos (GSSAPI), which the ssh config does not "
            f"turn on for {alias}",
            hint=f"add `GSSAPIAuthentication yes` to Host {alias} in {config_name}, and run `kinit`",
        )
    if ticket is False:
        return ConnectionFailed(
            f"cannot log in to {target}: no Kerberos ticket (`klist` shows none)",
            hint="run `kinit` to get one, then try again",
        )
    if ticket is True:
        return ConnectionFailed(
            f"cannot log in to {target}: the server did not accept your Kerberos ticket",
            hint="is it for the right realm and not expired (see `klist`)? `kinit` gets a new one; "
            f"`ssh -v {alias}` shows why",
        )
    return ConnectionFailed(
        f"cannot log in to {target}: it accepts only Kerberos (GSSAPI) and no ticket was accepted"
        if only_gssapi
        else f"cannot log in to {target}: no Kerberos ticket was accepted, and there is no key to offer",
        hint="run `kinit` to get a Kerberos ticket (see `klist`), then try again",
    )
