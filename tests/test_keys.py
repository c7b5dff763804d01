"""Master keys and key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.keys import (
    KEY_FILE_ENV,
    Keyring,
    MasterKey,
    default_key_file,
    load_key_file,
    load_or_create_key_file,
    new_key_warning,
    write_key_file,
)


def test_key_id_is_stable_and_distinct() -> None:
    key = MasterKey.generate()
    assert MasterKey(key.material).key_id == key.key_id
    assert MasterKey.generate().key_id != key.key_id
    assert len(key.key_id_hex) == 16
    assert key.material.hex() not in repr(key)


def test_text_round_trip_and_bad_text() -> None:
    key = MasterKey.generate()
    assert MasterKey.from_text(key.to_text()) == key
    assert MasterKey.from_text("# comment\n" + key.to_text() + "\n") == key
    with pytest.raises(ConfigError, match="not valid base64"):
        MasterKey.from_text("pgbackflow-key-v1:***")
    with pytest.raises(ConfigError, match="decodes to 3 bytes"):
        MasterKey.from_text("pgbackflow-key-v1:YWJj")
    with pytest.raises(ConfigError, match="found 0 non-comment lines"):
        MasterKey.from_text("# only a comment")


def test_first_run_creates_a_0600_key_file_once(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "master.key"
    key, created = load_or_create_key_file(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    warning = new_key_warning(path, key)
    assert "NEW MASTER KEY" in warning and str(path) in warning and key.key_id_hex in warning
    assert key.to_text() not in warning
    again, created_again = load_or_create_key_file(path)
    assert again == key and not created_again


def test_key_file_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, MasterKey.generate())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        write_key_file(path, MasterKey.generate())
    assert path.read_bytes() == before


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, MasterKey.generate())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_key_file(path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_key_file(tmp_path / "nope.key")


def test_default_key_file_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "k"))
    assert default_key_file() == tmp_path / "k"


def test_keyring_lookup() -> None:
    first, second = MasterKey.generate(), MasterKey.generate()
    ring = Keyring([first, second])
    assert ring.current == first
    assert ring.find(second.key_id) == second
    assert ring.find(b"\0" * 8) is None
    with pytest.raises(ConfigError):
        Keyring([])
