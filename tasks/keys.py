"""Master keys: the secret that wraps every archive's data key.

A master key is 32 random bytes. Its *key id* is derived from the key itself
(HMAC-SHA256 over a fixed label, first 8 bytes), so an archive header can name the key it
needs without revealing anything about it, and a wrong key is recognised before any
decryption is attempted.

Keys for other purposes are derived from the master key with HKDF-SHA256 under distinct
labels (:func:`derive_subkey`), so e.g. the manifest MAC key is never the encryption key.

On disk a key file is text (see docs/FORMAT.md)::

    # comment lines
    pgbackflow-key-v1:<base64 of the 32 key bytes>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgbackflow.tasks.errors import ConfigError

KEY_BYTES = 32
KEY_ID_BYTES = 8
KEY_TEXT_PREFIX = "pgbackflow-key-v1:"
_KEY_ID_LABEL = b"pgbackflow master key id v1"
KEY_FILE_ENV = "PGBACKFLOW_KEY_FILE"
#: What to do about a wrong key: after `key rotate`, the key a backup needs is the new one.
WRONG_KEY_HINT = ("use the key file of that id (the backup's own, or the one `key rotate` "
                  "moved it to)")
MANIFEST_MAC_INFO = b"pgbackflow manifest mac v1"
"""HKDF ``info`` of the key that authenticates manifests (docs/FORMAT.md)."""



def derive_key_id(material: bytes) -> bytes:
    """Return the 8-byte id of a master key (a keyed hash: reveals nothing of the key)."""
    return hmac.new(material, _KEY_ID_LABEL, hashlib.sha256).digest()[:KEY_ID_BYTES]


def derive_subkey(material: bytes, info: bytes) -> bytes:
    """A 32-byte key for one purpose, derived from a master key (HKDF-SHA256, no salt).

    Distinct ``info`` labels give independent keys, so a key used to authenticate
    manifests never doubles as the key that wraps data keys.
    """
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
        material
    )


@dataclass(frozen=True)
class MasterKey:
    """A 256-bit master key and its id.

    Attributes:
        material: The 32 secret key bytes (never shown by repr).
        key_id: The 8-byte id derived from ``material``.
    """

    material: bytes = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_BYTES:
            raise ConfigError(
                f"master key has {len(self.material)} bytes, expected {KEY_BYTES}: "
                "use a key made by pgbackflow"
            )
        object.__setattr__(self, "key_id", derive_key_id(self.material))

    @property
    def key_id_hex(self) -> str:
        """The key id as 16 hex characters, as shown to users."""
        return self.key_id.hex()

    @property
    def manifest_mac_key(self) -> bytes:
        """The HMAC-SHA256 key that authenticates manifests (HKDF, ``MANIFEST_MAC_INFO``)."""
        return derive_subkey(self.material, MANIFEST_MAC_INFO)

    @classmethod
    def generate(cls) -> MasterKey:
        """Make a new random master key."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str, *, source: str = "key") -> MasterKey:
        """Parse the key-file text form (comments allowed) or bare base64.

        Args:
            text: Key file contents or the value of a key block.
            source: What the text came from, for error messages.
        """
        lines = [ln.strip() for ln in text.splitlines()]
        payload = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(payload) != 1:
            raise ConfigError(
                f"{source}: expected one line '{KEY_TEXT_PREFIX}<base64>', found "
                f"{len(payload)} non-comment lines: use a key file written by pgbackflow"
            )
        value = payload[0].removeprefix(KEY_TEXT_PREFIX)
        try:
            material = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{source}: key is not valid base64: use a key file written by pgbackflow"
            ) from None
        if len(material) != KEY_BYTES:
            raise ConfigError(
                f"{source}: key decodes to {len(material)} bytes, expected {KEY_BYTES}: "
                "use a key file written by pgbackflow"
            )
        return cls(material)

    def to_text(self) -> str:
        """The one-line text form stored in key files and key blocks."""
        return KEY_TEXT_PREFIX + base64.b64encode(self.material).decode("ascii")


class Keyring:
    """The master keys a reader may use, looked up by key id (current key first)."""

    def __init__(self, keys: Iterable[MasterKey]) -> None:
        self._keys: dict[bytes, MasterKey] = {}
        for key in keys:
            self._keys.setdefault(key.key_id, key)
        if not self._keys:
            raise ConfigError("no master key given: pass --key-file or a key block")

    def __iter__(self) -> Iterator[MasterKey]:
        return iter(self._keys.values())

    def __repr__(self) -> str:
        return f"Keyring(key_ids={[k.hex() for k in self._keys]})"

    @property
    def current(self) -> MasterKey:
        """The key new archives are written with."""
        return next(iter(self._keys.values()))

    def find(self, key_id: bytes) -> MasterKey | None:
        """The key with ``key_id``, or None."""
        return self._keys.get(key_id)

    def find_hex(self, key_id_hex: str) -> MasterKey | None:
        """The key whose id is ``key_id_hex`` (16 hex characters), or None."""
        try:
            return self._keys.get(bytes.fromhex(key_id_hex))
        except ValueError:
            return None

    def key_ids_hex(self) -> list[str]:
        """Ids of all keys held, as hex."""
        return [k.hex() for k in self._keys]


def default_key_file() -> Path:
    """Where the master key lives when none is named: $PGBACKFLOW_KEY_FILE or the config dir."""
    if env := os.environ.get(KEY_FILE_ENV):
        return Path(env).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "pgbackflow" / "master.key"


def load_key_file(path: Path) -> MasterKey:
    """Read a key file, refusing one that other users can read."""
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"key file '{path}' does not exist: pass an existing one (for existing backups, "
            f"the one they were made with), or create one with pgbackflow key init "
            f"--key-file '{path}'"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise ConfigError(f"key file '{path}' cannot be read ({reason})") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file '{path}' is readable by other users (mode {stat.S_IMODE(info.st_mode):o}):"
            f" run chmod 600 '{path}'"
        )
    return MasterKey.from_text(text, source=f"key file '{path}'")


def write_key_file(path: Path, key: MasterKey) -> None:
    """Create a key file with mode 0600; never overwrites an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = (
        "# pgbackflow master key. Without it no backup made with it can be decrypted.\n"
        "# Keep a copy somewhere other than the backups themselves.\n"
        f"# key id: {key.key_id_hex}\n"
        f"{key.to_text()}\n"
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"key file '{path}' already exists: refusing to overwrite it") from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())


def new_key_warning(path: Path, key: MasterKey) -> str:
    """The loud, one-time message shown when a master key was just generated."""
    return (
        f"NEW MASTER KEY generated at {path} (key id {key.key_id_hex}). "
        "Copy this file somewhere safe NOW, away from the backups: "
        "without it no backup can ever be decrypted."
    )


def load_or_create_key_file(path: Path | None = None) -> tuple[MasterKey, bool]:
    """Load the master key file, generating it on first use.

    Returns:
        The key and whether it was created by this call: the caller then tells the user,
        loudly and once, with :func:`new_key_warning`.
    """
    path = path or default_key_file()
    if path.exists():
        return load_key_file(path), False
    key = MasterKey.generate()
    write_key_file(path, key)
    return key, True
