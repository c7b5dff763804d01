"""SSH tunnels to databases in closed networks: the one place that opens them.

A database block may name an SSH bastion. :func:`open_tunnel` then runs OpenSSH's ``ssh -N
-L 127.0.0.1:<free port>:<db host>:<db port>`` through the one subprocess runner
(tasks/process.py) and yields connection settings whose ``via`` points libpq (psycopg,
pg_dump, pg_dumpall, pg_restore, pg_basebackup, pg_receivewal) at the tunnel's local end.

- The bastion's host key is the configured one and nothing else: a temporary known_hosts
  holding only it, ``StrictHostKeyChecking=yes``; a mismatch or a key of an unconfigured type
  is a one-line error and no connection.
- The private key reaches ssh as a 0600 file that lives in memory (``/proc/<pid>/fd/<n>`` of
  a memfd; a temp file removed on exit where there is none), never in argv, the environment
  or a log. ssh ignores the user's config and agent (``-F /dev/null``, ``IdentitiesOnly``).
- ssh dies with the thread that opened the tunnel (a kill -9 of the flow process included)
  and is stopped when the block exits, on success or failure.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from pgbackflow.tasks.database import ConnectionSettings, TunnelEnd, private_file
from pgbackflow.tasks.errors import ConfigError, DatabaseError, TransientDatabaseError
from pgbackflow.tasks.process import BackgroundTool, Tool

LOCAL_ADDRESS = "127.0.0.1"
#: ssh's own connect timeout; the whole start (connect, key exchange, login) gets more.
CONNECT_TIMEOUT_S = 10
START_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3
#: The name the configured host key is stored under (whatever host and port reach it).
_HOST_ALIAS = "pgbackflow-bastion"
_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
_NAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._:%-]*$")


class TunnelError(DatabaseError):
    """The tunnel could not be opened for a reason that will not pass by itself."""


class UnreachableBastionError(TransientDatabaseError):
    """The bastion did not answer (refused, timed out): worth retrying.

    Attributes:
        waiting_for: The line each retry logs.
    """

    def __init__(self, message: str, waiting_for: str) -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


@dataclass(frozen=True)
class SshBastion:
    """An SSH server through which the database is reached.

    Attributes:
        host: Host name or address of the bastion.
        port: Its SSH port.
        user: Login on the bastion (needs no shell: only port forwarding).
        private_key: The login's private key (OpenSSH or PEM, without passphrase).
        host_key: The bastion's public host key(s), one per line, as ``ssh-keyscan`` prints
            them (``[host] type base64``) or as in ``/etc/ssh/ssh_host_*_key.pub``.
    """

    host: str
    user: str
    private_key: str = field(repr=False)
    host_key: str
    port: int = 22

    @property
    def display(self) -> str:
        """``user@host:port``: for messages."""
        return f"{self.user}@{self.host}:{self.port}"

    def known_hosts(self) -> bytes:
        """The configured host keys as known_hosts lines under the tunnel's alias.

        Raises:
            ConfigError: none is configured, or a line is not a public key.
        """
        where = f"ssh bastion {self.display}"
        lines = [line.strip() for line in self.host_key.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(
                f"{where}: no host key is configured, so the bastion cannot be told from an "
                f"impostor: set ssh_host_key to its public host key (ssh-keyscan -p {self.port} "
                f"{self.host}, checked against the bastion's own /etc/ssh/ssh_host_*_key.pub)"
            )
        entries = []
        for number, line in enumerate(lines, 1):
            words = line.split()
            at = next((i for i, word in enumerate(words) if word in _KEY_TYPES), None)
            blob = words[at + 1] if at is not None and at + 1 < len(words) else ""
            try:
                decoded = base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if at is None or not decoded.startswith(
                len(words[at]).to_bytes(4, "big") + words[at].encode()
            ) or not _whole_key_blob(decoded):
                raise ConfigError(
                    f"{where}: line {number} of ssh_host_key is not a public host key: use "
                    "'TYPE BASE64' lines (e.g. 'ssh-ed25519 AAAA...') as ssh-keyscan prints them"
                )
            entries.append(f"{_HOST_ALIAS} {words[at]} {blob}\n")
        return "".join(entries).encode()

    def key_material(self) -> bytes:
        """The private key as ssh reads it (with its final newline).

        Raises:
            ConfigError: it is not a private key.
        """
        text = self.private_key.strip().replace("\r\n", "\n")
        if not (text.startswith("-----BEGIN ") and text.endswith("PRIVATE KEY-----")):
            raise ConfigError(
                f"ssh bastion {self.display}: ssh_private_key is not a private key: paste the "
                "whole key file, from -----BEGIN ... PRIVATE KEY----- to its END line"
            )
        return (text + "\n").encode()

    def check(self) -> None:
        """Refuse names that ssh would read as options or that cannot be hosts.

        Raises:
            ConfigError: naming the field.
        """
        for what, value in (("ssh_host", self.host), ("ssh_user", self.user)):
            if not _NAME.match(value):
                raise ConfigError(
                    f"ssh bastion {what} {value!r} is invalid: use letters, digits, '.', '_', "
                    "'-' (not first), ':' and '%'"
                )
        if not 0 < self.port < 65536:
            raise ConfigError(f"ssh bastion port {self.port} is out of range: use 1-65535")


def _whole_key_blob(blob: bytes) -> bool:
    """Whether a public key blob is whole: SSH key blobs (every key type) are a sequence of
    length-prefixed fields that ends exactly at the blob's end; a cut one does not."""
    offset = 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            return False
        offset += 4 + int.from_bytes(blob[offset:offset + 4], "big")
    return offset == len(blob) and len(blob) > 4


def _forward_target(settings: ConnectionSettings) -> str:
    """The ``-L`` destination as the bastion sees it: host:port, [v6]:port or a socket."""
    if settings.host.startswith("/"):  # a Unix socket directory on the bastion
        return f"{settings.host.rstrip('/')}/.s.PGSQL.{settings.port}"
    if not _NAME.match(settings.host):
        raise ConfigError(
            f"database host {settings.host!r} cannot be reached through a tunnel: use a host "
            "name, an IP address or a socket directory"
        )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.port}"


def _ssh_args(bastion: SshBastion, key_path: str, known_hosts: str, local_port: int,
              target: str) -> list[str]:
    options = {
        "BatchMode": "yes", "IdentitiesOnly": "yes", "IdentityAgent": "none",
        "IdentityFile": key_path, "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no", "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": known_hosts, "GlobalKnownHostsFile": "/dev/null",
        "HostKeyAlias": _HOST_ALIAS, "CheckHostIP": "no", "UpdateHostKeys": "no",
        "ExitOnForwardFailure": "yes", "ConnectTimeout": str(CONNECT_TIMEOUT_S),
        "ServerAliveInterval": "15", "ServerAliveCountMax": "3", "ControlMaster": "no",
        "ControlPath": "none", "ClearAllForwardings": "no", "Tunnel": "no",
        "PermitLocalCommand": "no",
    }
    args = ["-N", "-F", "/dev/null", "-p", str(bastion.port), "-l", bastion.user]
    for name, value in options.items():
        args += ["-o", f"{name}={value}"]
    return [*args, "-L", f"{LOCAL_ADDRESS}:{local_port}:{target}", bastion.host]


def _listening(port: int) -> bool:
    """Whether something (our ssh) listens on 127.0.0.1:port, from /proc/net/tcp."""
    wanted = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(fields[1] == wanted and fields[3] == "0A"
               for fields in (line.split() for line in lines) if len(fields) > 3)


def _type_label(key_type: str) -> str:
    """How ssh names a key type in its messages: ssh-ed25519 → ED25519, ecdsa-… → ECDSA."""
    label = "ECDSA" if "ecdsa" in key_type else key_type.split("@")[0].split("-")[-1].upper()
    return f"{label}-SK" if key_type.startswith("sk-") else label


def _failure(bastion: SshBastion, stderr: str) -> Exception:
    """A one-line error from what ssh said when it gave up."""
    where = f"ssh bastion {bastion.display}"
    fingerprint = re.search(r"SHA256:[A-Za-z0-9+/=]+", stderr)
    offered = re.search(r"The fingerprint for the (\S+) key sent by the remote host", stderr)
    keyscan = f"ssh-keyscan -p {bastion.port} {bastion.host}"
    configured = {_type_label(word) for word in bastion.host_key.split() if word in _KEY_TYPES}
    # ssh calls a key of a type we hold no key of "changed" too: that one is unknown.
    changed = "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
    if changed and offered and offered.group(1) not in configured:
        return TunnelError(
            f"{where}: unknown host key: the bastion presented {offered.group(1)} host key"
            f"{' ' + fingerprint.group(0) if fingerprint else ''}, and ssh_host_key holds no "
            f"key of that type (only {', '.join(sorted(configured))}), so nothing was sent to "
            "it: after checking its fingerprint with the bastion's administrator, add it "
            f"({keyscan}) to ssh_host_key"
        )
    if changed:
        sent = f" ({offered.group(1) if offered else 'its'} key "\
               f"{fingerprint.group(0) if fingerprint else ''})".replace(" )", ")")
        return TunnelError(
            f"{where}: host key mismatch: the bastion presented a host key{sent} that differs "
            "from the configured ssh_host_key, so nothing was sent to it: if its key was "
            f"changed on purpose, confirm the new fingerprint with its administrator and put "
            f"the new key ({keyscan}) into ssh_host_key; otherwise someone may be "
            "intercepting the connection"
        )
    unknown = re.search(r"No (\S+) host key is known for", stderr)
    if unknown or "Host key verification failed" in stderr:
        kind = unknown.group(1) if unknown else "its"
        return TunnelError(
            f"{where}: unknown host key: the bastion presented {kind} host key"
            f"{' ' + fingerprint.group(0) if fingerprint else ''}, which is not among the "
            "configured ssh_host_key, so nothing was sent to it: after checking its "
            f"fingerprint with the bastion's administrator, add it ({keyscan}) to ssh_host_key"
        )
    if "Permission denied" in stderr:
        return TunnelError(
            f"{where}: login refused (Permission denied): check ssh_user and that the public "
            "half of ssh_private_key is in that user's authorized_keys on the bastion"
        )
    for reason in ("Connection refused", "Connection timed out", "No route to host",
                   "Network is unreachable", "Connection reset", "Connection closed"):
        if reason in stderr:
            return UnreachableBastionError(
                f"{where}: {reason.lower()}: check that the bastion runs sshd on port "
                f"{bastion.port} and that this worker may reach it",
                f"ssh bastion {bastion.host}:{bastion.port} not reachable ({reason.lower()})",
            )
    if "Could not resolve hostname" in stderr:
        return TunnelError(f"{where}: unknown host {bastion.host!r}: check ssh_host")
    if "invalid format" in stderr or "Load key" in stderr:
        return TunnelError(
            f"{where}: ssh cannot use ssh_private_key (a passphrase-protected or damaged key?): "
            "give the key without a passphrase"
        )
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return TunnelError(
        f"{where}: the tunnel did not open ({lines[-1] if lines else 'ssh exited'})"
    )


def _start(ssh: Tool, stack: ExitStack, bastion: SshBastion, args: list[str],
           local_port: int) -> BackgroundTool | None:
    """Start ssh and wait until its local end listens; None when the port was taken."""
    process = stack.enter_context(ssh.background(args))
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        result = process.exited()
        if result is not None:
            text = result.stderr_tail
            if "cannot listen to port" in text or "Address already in use" in text:
                return None
            raise _failure(bastion, text)
        if _listening(local_port):
            return process
        if time.monotonic() > deadline:
            process.stop(timeout=2)
            raise UnreachableBastionError(
                f"ssh bastion {bastion.display}: the tunnel was not up after "
                f"{START_TIMEOUT_S:.0f} s: check that the bastion answers SSH on port "
                f"{bastion.port}",
                f"ssh bastion {bastion.host}:{bastion.port} not answering",
            )
        time.sleep(0.05)


@contextmanager
def open_tunnel(settings: ConnectionSettings, bastion: SshBastion) -> Iterator[ConnectionSettings]:
    """Open an SSH tunnel to the database; yields the settings that connect through it.

    Raises:
        ConfigError: the bastion's settings are unusable (no host key, not a private key).
        TunnelError: host key mismatch or unknown, login refused, other ssh failures.
        UnreachableBastionError: the bastion did not answer (transient).
    """
    from pgbackflow.tasks.cluster import free_port

    bastion.check()
    target = _forward_target(settings)
    known_hosts, key = bastion.known_hosts(), bastion.key_material()
    binary = shutil.which("ssh")
    if binary is None:
        raise ConfigError(
            f"ssh bastion {bastion.display}: the OpenSSH client (ssh) is not installed on "
            "this worker: install it (apt-get install openssh-client)"
        )
    ssh = Tool(Path(binary), "ssh")
    with ExitStack() as stack:
        key_path = stack.enter_context(private_file(key, ".sshkey"))
        hosts_path = stack.enter_context(private_file(known_hosts, ".sshkey"))
        for _ in range(_PORT_ATTEMPTS):
            local_port = free_port()
            process = _start(
                ssh, stack, bastion, _ssh_args(bastion, key_path, hosts_path, local_port,
                                               target), local_port,
            )
            if process is not None:
                break
        else:
            raise TunnelError(
                f"ssh bastion {bastion.display}: no free local port for the tunnel after "
                f"{_PORT_ATTEMPTS} attempts: retry"
            )
        try:
            yield replace(settings, via=TunnelEnd(LOCAL_ADDRESS, local_port, bastion.display))
        finally:
            process.stop(timeout=5)
