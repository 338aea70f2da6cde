"""Logging in on an SSH connection: agent keys, key files, keyboard-interactive and password.

The order is OpenSSH's: keys first (the agent's, then files, each offered once), then the prompted
methods through a :data:`Prompter`, so a site that wants a key and then a one-time code (MFA) asks
for the code once per connection. A key with a user certificate (``CertificateFile``, or
``KEY-cert.pub`` beside the key; also for keys held by the agent) is offered with it first; an
expired certificate is not offered and says so in the error.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hpclaunch.errors import ConnectionFailed, HostKeyError
from hpclaunch.transport.base import reason
from hpclaunch.transport.keyfile import warn_if_exposed
from hpclaunch.transport.sshcert import Certificate, load_certificate

if TYPE_CHECKING:
    import paramiko

    from hpclaunch.transport.hostsettings import HostSettings

log = logging.getLogger(__name__)

#: Answers keyboard-interactive prompts: ``(title, instructions, [(prompt, echo), ...]) -> answers``.
Prompter = Callable[[str, str, Sequence[tuple[str, bool]]], Sequence[str]]

#: A human typing a one-time code needs longer than paramiko's 30 s auth timeout.
INTERACTIVE_AUTH_TIMEOUT = 300.0
#: paramiko 5 removed GSSAPI; the system ssh does Kerberos.
NO_GSSAPI = (
    "the ssh config asks for Kerberos (GSSAPIAuthentication yes), which the paramiko transport cannot do"
)
USE_OPENSSH = 'use the OpenSSH transport: transport = "openssh" in the profile (or --transport openssh)'


def terminal_prompter(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> Sequence[str]:
    """Ask on the terminal: hidden input for secrets (``getpass``), visible for the rest."""
    if not prompts:
        return []
    if not sys.stdin or not sys.stdin.isatty():
        raise ConnectionFailed(
            "the server asks for keyboard-interactive input (a password or one-time code) "
            "and there is no terminal to ask on",
            hint="run the command once from a terminal, or use a key the server accepts on its own",
        )
    for text in (title, instructions):
        if text and text.strip():
            print(text.strip(), file=sys.stderr)
    answers = []
    for prompt, echo in prompts:
        if echo:
            sys.stderr.write(prompt)
            sys.stderr.flush()
            answers.append(sys.stdin.readline().rstrip("\n"))
        else:
            answers.append(getpass.getpass(prompt))
    return answers


def _public_blob(path: str) -> bytes | None:
    """The public key next to a private key file (``.pub``), to match it with agent keys."""
    try:
        with open(path + ".pub", encoding="utf-8") as fh:
            fields = fh.read().split()
        return base64.b64decode(fields[1], validate=True) if len(fields) >= 2 else None
    except (OSError, binascii.Error, ValueError):
        return None


def _certificate_for(key: paramiko.PKey, certs: list[Certificate], beside: str | None) -> Certificate | None:
    """The certificate of ``key``: a CertificateFile that certifies it, else ``KEY-cert.pub``."""
    blob = key.asbytes()
    if key.get_name().endswith("-cert-v01@openssh.com"):
        return None  # the agent holds the certificate itself
    for cert in certs:
        if cert.public_key == blob:
            return cert
    found = load_certificate(beside + "-cert.pub") if beside is not None else None
    return found if found is not None and found.public_key == blob else None


class Authenticator:
    """Logs one user in on an open paramiko transport; raises ConnectionFailed with every reason."""

    def __init__(
        self,
        prompter: Prompter | None = None,
        *,
        allow_agent: bool = True,
        config_name: str = "~/.ssh/config",
    ) -> None:
        self._prompter: Prompter = prompter or terminal_prompter
        self._allow_agent = allow_agent
        self._config_name = config_name

    def login(self, transport: paramiko.Transport, s: HostSettings, via: str) -> None:
        import paramiko

        where = f"cannot log in to {s.target}{via}"
        try:
            transport.auth_none(s.user)
            return  # the server wants nothing more (rare, but then we are done)
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
        except paramiko.AuthenticationException:
            allowed = ["publickey", "keyboard-interactive", "password"]
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionFailed(f"{where}: the connection closed during login ({reason(exc)})") from None

        if allowed and all(m.startswith("gssapi") for m in allowed):
            # paramiko 5 has no GSSAPI at all: no retry here can work, the OpenSSH transport can.
            raise ConnectionFailed(
                f"{where}: it accepts only Kerberos (GSSAPI), which the paramiko transport cannot do",
                hint=USE_OPENSSH,
            )
        # The config asks for Kerberos and the server offers it: if nothing else works, that is why.
        wants_kerberos = s.gssapi_authentication and any(m.startswith("gssapi") for m in allowed)
        problems: list[str] = []
        try:
            if "publickey" in allowed:
                next_methods = self.publickey(transport, s, problems)
                if transport.is_authenticated():
                    return
                if next_methods:
                    allowed = next_methods  # partial success: the key was step one (MFA)
            else:
                problems.append(f"the server does not accept SSH keys (it allows: {', '.join(allowed)})")
            for method in ("keyboard-interactive", "password"):
                if method in allowed and not transport.is_authenticated():
                    allowed = self._prompted(transport, s, method, problems) or allowed
            if transport.is_authenticated():
                return
        except HostKeyError:
            raise
        except ConnectionFailed as exc:
            # The prompter's own error (no terminal) says it best, with what else failed.
            if wants_kerberos:
                raise ConnectionFailed(
                    f"{where}: {NO_GSSAPI}; {'; '.join([*problems, exc.message])}", hint=USE_OPENSSH
                ) from None
            raise ConnectionFailed(f"{where}: {'; '.join([*problems, exc.message])}", hint=exc.hint) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ConnectionFailed(f"{where}: the connection closed during login ({reason(exc)})") from None
        if wants_kerberos:
            raise ConnectionFailed(
                f"{where}: {NO_GSSAPI}; {'; '.join(problems) or 'nothing else was accepted'}",
                hint=USE_OPENSSH,
            )
        raise ConnectionFailed(
            f"{where}: {'; '.join(problems) or 'the server refused every method we tried'}",
            hint=f"is your public key in ~/.ssh/authorized_keys on the cluster? "
            f"check User and IdentityFile of {s.alias} in {self._config_name}",
        )

    def _agent_keys(self, s: HostSettings) -> list[paramiko.PKey]:
        """The agent's keys: ``$SSH_AUTH_SOCK``, or the IdentityAgent socket; none for ``none``."""
        import paramiko
        from paramiko.agent import AgentSSH

        if not self._allow_agent or s.identity_agent == "none":
            return []
        if s.identity_agent is None and not os.environ.get("SSH_AUTH_SOCK"):
            return []
        try:
            if s.identity_agent is None:
                return list(paramiko.Agent().get_keys())
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(s.identity_agent)
            # paramiko's Agent reads only $SSH_AUTH_SOCK; give it this socket instead.
            agent = paramiko.Agent.__new__(paramiko.Agent)
            AgentSSH.__init__(agent)
            agent._connect(sock)  # type: ignore[attr-defined]
            return list(agent.get_keys())
        except (paramiko.SSHException, OSError) as exc:
            log.debug("ssh-agent %s unavailable: %s", s.identity_agent or "$SSH_AUTH_SOCK", exc)
            return []

    def publickey(
        self, transport: paramiko.Transport, s: HostSettings, problems: list[str]
    ) -> list[str] | None:
        """Offer agent keys, then key files; None when no key worked, else the next methods."""
        import paramiko
        from paramiko.pkey import PublicBlob

        files = [f for f in s.identity_files if os.path.exists(f)]
        missing = [f for f in s.identity_files if not os.path.exists(f)]
        file_blobs = {f: _public_blob(f) for f in files}
        certs = [c for c in map(load_certificate, s.certificate_files) if c is not None]
        agent_keys = self._agent_keys(s)
        if s.identities_only:
            wanted = {b for b in file_blobs.values() if b is not None} | {c.public_key for c in certs}
            agent_keys = [k for k in agent_keys if k.asbytes() in wanted]
        tried_blobs: set[bytes] = set()
        offered: list[str] = []
        cert_problems: list[str] = []

        def try_key(key: paramiko.PKey, label: str) -> list[str] | None:
            tried_blobs.add(key.asbytes())
            offered.append(label)
            try:
                return list(transport.auth_publickey(s.user, key))
            except paramiko.BadAuthenticationType:
                return None
            except paramiko.AuthenticationException:
                return None

        def offer(key: paramiko.PKey, label: str, beside: str | None = None) -> list[str] | None:
            """With its certificate first (if one is valid), then the plain key, like OpenSSH."""
            cert = _certificate_for(key, certs, beside)
            if cert is not None and (problem := cert.problem()) is not None:
                cert_problems.append(problem)
                cert = None
            key.public_blob = None  # paramiko attaches KEY-cert.pub unchecked; we attach ours below
            if cert is not None:
                key.public_blob = PublicBlob(cert.cert_type, cert.blob)
                result = try_key(key, f"{label} with certificate {cert.path}")
                key.public_blob = None
                if transport.is_authenticated() or result:
                    return result
            return try_key(key, label)

        for key in agent_keys:
            result = offer(key, f"agent key {key.get_name()}")
            if transport.is_authenticated() or result:
                return result
        for path in files:
            blob = file_blobs[path]
            if blob is not None and blob in tried_blobs:
                continue  # the agent already offered this one
            warn_if_exposed(path)
            try:
                key = paramiko.PKey.from_path(path)
            except (paramiko.PasswordRequiredException, TypeError) as exc:
                # cryptography raises TypeError for "encrypted but no password given".
                if isinstance(exc, TypeError) and "encrypted" not in str(exc) and "password" not in str(exc):
                    problems.append(f"cannot load key {path}: {exc}")
                    continue
                problems.append(
                    f"key {path} is protected by a passphrase and ssh-agent does not hold it "
                    f"(run `ssh-add {path}` first)"
                )
                continue
            except (paramiko.SSHException, ValueError, OSError) as exc:
                problems.append(f"cannot load key {path}: {reason(exc)}")
                continue
            if key.asbytes() in tried_blobs:
                continue
            result = offer(key, path, beside=path)
            if transport.is_authenticated() or result:
                return result
        if offered:
            problems.insert(0, f"the server refused every key offered ({', '.join(offered)})")
        elif not any("passphrase" in p for p in problems):
            places = ", ".join(missing) if missing else "none configured"
            problems.insert(0, f"no SSH key to offer (no ssh-agent keys; key files: {places})")
        problems[:0] = cert_problems  # the likeliest reason a site's login fails: say it first
        return None

    def _prompted(
        self, transport: paramiko.Transport, s: HostSettings, method: str, problems: list[str]
    ) -> list[str] | None:
        """keyboard-interactive or password through the prompter, once per login."""
        import paramiko

        failure: list[BaseException] = []

        def handler(title: str, instructions: str, prompts: Sequence[tuple[str, bool]]) -> list[str]:
            # Runs in paramiko's thread: keep our exception to re-raise it here, not in there.
            if failure:
                return ["" for _ in prompts]
            try:
                return list(self._prompter(title, instructions, list(prompts)))
            except BaseException as exc:
                failure.append(exc)
                return ["" for _ in prompts]

        saved_timeout = transport.auth_timeout
        transport.auth_timeout = INTERACTIVE_AUTH_TIMEOUT
        try:
            if method == "keyboard-interactive":
                result = transport.auth_interactive(s.user, handler)
            else:
                answers = handler("", "", [(f"{s.user}@{s.hostname}'s password: ", False)])
                if failure:
                    raise failure[0]
                result = transport.auth_password(s.user, answers[0], fallback=False)
        except paramiko.AuthenticationException:
            if failure:
                raise failure[0] from None
            problems.append(f"{method} login was refused")
            return None
        finally:
            transport.auth_timeout = saved_timeout
        if failure:
            raise failure[0]
        return list(result)
