"""The pgbackflow console script, run as a user would run it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from pgbackflow.tasks.archive import ArchiveWriter
from pgbackflow.tasks.keys import MasterKey, load_key_file, write_key_file
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it

#: The command in this interpreter, without the launcher (to see what it imports).
IN_PROCESS = [sys.executable, "-c", "from pgbackflow.cli import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """``pgbackflow ARGS`` through the launcher and a warm daemon, as users run it."""
    return subprocess.run([str(PGBACKFLOW), *args], capture_output=True, text=True,
                          timeout=120, check=False, env=as_users_run_it(dict(os.environ)))


def test_key_init_then_decrypt(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "master.key"
    created = run("key", "init", "--key-file", str(key_file))
    assert created.returncode == 0, created.stderr
    assert "NEW MASTER KEY" in created.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = load_key_file(key_file)
    assert created.stdout.strip() == key.key_id_hex

    again = run("key", "init", "--key-file", str(key_file))
    assert again.returncode == 1 and "already exists" in again.stderr

    archive, plain = tmp_path / "dump.pgbf", tmp_path / "dump.plain"
    with archive.open("wb") as sink, ArchiveWriter(sink, key, compress=True) as writer:
        writer.write(b"PGDMP" + b"rows" * 100_000)
    result = run("decrypt", "--key-file", str(key_file), str(archive), str(plain))
    assert result.returncode == 0, result.stderr
    assert plain.read_bytes() == b"PGDMP" + b"rows" * 100_000


def test_decrypt_errors_are_one_line_and_leave_no_output(tmp_path: Path) -> None:
    key, other = MasterKey.generate(), MasterKey.generate()
    write_key_file(tmp_path / "other.key", other)
    archive = tmp_path / "dump.pgbf"
    with archive.open("wb") as sink, ArchiveWriter(sink, key, compress=False) as writer:
        writer.write(b"x" * 3_000_000)
    target = tmp_path / "out"

    wrong_key = run("decrypt", "--key-file", str(tmp_path / "other.key"), str(archive), str(target))
    assert wrong_key.returncode == 1
    assert "wrong encryption key" in wrong_key.stderr and key.key_id_hex in wrong_key.stderr
    assert "Traceback" not in wrong_key.stderr
    assert wrong_key.stderr.strip().count("\n") == 0

    write_key_file(tmp_path / "right.key", key)
    archive.write_bytes(archive.read_bytes()[:-40])  # cut inside the final chunk
    truncated = run("decrypt", "--key-file", str(tmp_path / "right.key"), str(archive), str(target))
    assert truncated.returncode == 1 and "truncated" in truncated.stderr
    assert not target.exists()
    assert list(tmp_path.glob(".out*")) == []

    missing = run("decrypt", "--key-file", str(tmp_path / "nope.key"), str(archive), str(target))
    assert missing.returncode == 1
    assert "key file" in missing.stderr and "does not exist" in missing.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "decrypt", "--key-file", str(tmp_path / "nope.key"), "a", "b")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_listing_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-backups"
    for command in ("list", "physical-list"):
        result = run(command, "--from", str(missing))
        assert result.returncode == 1, (command, result.stdout)
        assert result.stderr.strip() == (
            f"error: local storage folder '{missing}' does not exist: check the path"
        )
        assert not missing.exists()
    (tmp_path / "empty").mkdir()
    empty = run("list", "--from", str(tmp_path / "empty"))
    assert empty.returncode == 0 and "0 backups" in empty.stdout


def test_usage_errors_are_one_line_with_click_s_exit_code() -> None:
    """Typer printed a usage error as a box of four or five lines; the CLI says it in one
    line naming the input and where the help is, exit 2 as before."""
    cases = {
        ("backup", "--nope"): "error: No such option: --nope (Possible options: --to): see "
                              "'pgbackflow backup --help'",
        ("backup",): "error: Missing option '--db': see 'pgbackflow backup --help'",
        ("key",): "error: Missing command: see 'pgbackflow key --help'",
        ("no-such-command",): "error: No such command 'no-such-command': see 'pgbackflow "
                              "--help'",
        ("retention", "--from", "/tmp", "--keep-last", "0"):
            "error: Invalid value for '--keep-last': Input should be greater than or equal to "
            "1: see 'pgbackflow retention --help'",
    }
    for argv, line in cases.items():
        result = run(*argv)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", line + "\n"), argv
    bare = run()  # no arguments: the help, no error line
    assert bare.returncode == 2 and "Usage: pgbackflow" in bare.stdout and bare.stderr == ""


def test_typer_exits_pass_through_the_error_wrapper() -> None:
    """A command's own exit code (wal-stream exits 2 on WAL gaps) is not an "unexpected" error."""
    import pytest
    import typer

    from pgbackflow.cli import user_errors

    @user_errors
    def command() -> None:
        raise typer.Exit(2)

    with pytest.raises(typer.Exit) as excinfo:
        command()
    assert excinfo.value.exit_code == 2


def test_commands_without_flows_do_not_import_prefect(tmp_path: Path) -> None:
    """Reading a storage runs no flow: Prefect's import (~3 s of a ~4 s command) is skipped."""
    (tmp_path / "store").mkdir()
    store = str(tmp_path / "store")
    # retention reads the key file; its own, not whatever ~/.config holds on this machine.
    key_file = tmp_path / "master.key"
    write_key_file(key_file, MasterKey.generate())
    env = {**os.environ, "PGBACKFLOW_KEY_FILE": str(key_file)}
    for args in (["list", "--from", store], ["physical-list", "--from", store],
                 ["retention", "--from", store, "--dry-run", "--keep-last", "2"]):
        result = subprocess.run([sys.executable, "-X", "importtime", *IN_PROCESS[1:], *args],
                                capture_output=True, text=True, timeout=120, check=False,
                                env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "pgbackflow.tasks.catalog" in imported, args  # the measure sees our imports
        assert "prefect" not in imported, args


def test_an_interruption_a_library_wrapped_still_ends_as_one() -> None:
    """Ctrl-C that lands inside a library which catches it and raises its own error (seen:
    pydantic's serializer, "PydanticSerializationError: ... KeyboardInterrupt") ends the
    command as an interruption (exit 130, "interrupted"), not as an unexpected error."""
    import signal

    import pytest
    import typer

    from pgbackflow.cli.common import user_errors_without_flows
    from pgbackflow.tasks import process

    @user_errors_without_flows
    def command() -> None:
        try:
            process.unwind(signal.SIGINT, None)  # what Ctrl-C does in a command
        except KeyboardInterrupt:
            raise ValueError("Error calling function '_ser_model': KeyboardInterrupt:") from None

    try:
        with pytest.raises(typer.Exit) as ended:
            command()
        assert ended.value.exit_code == 130
    finally:
        process._unwound_by.clear()  # this process goes on running other tests

    @user_errors_without_flows
    def failing() -> None:
        raise ValueError("a real bug")

    with pytest.raises(typer.Exit) as failed:
        failing()
    assert failed.value.exit_code == 1


_CTRL_C_WHILE_IMPORTING = """
import builtins, os, signal, sys
# As in a terminal: a process started from a non-interactive shell's background job (a CI
# runner's) inherits SIGINT ignored, and Python then keeps ignoring it.
signal.signal(signal.SIGINT, signal.default_int_handler)
real_import = builtins.__import__
def importing(name, *args, **kwargs):
    if name == "pgbackflow.cli":
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the CLI is imported
    return real_import(name, *args, **kwargs)
builtins.__import__ = importing
from pgbackflow.launcher import main
sys.argv = ["pgbackflow", *sys.argv[1:]]
main()
"""


def test_ctrl_c_while_the_cli_is_imported_is_no_traceback() -> None:
    """Ctrl-C in the first fraction of a second (a command of its own imports the CLI,
    seconds when it runs flows) printed a traceback of the imports."""
    env = {**os.environ, "PGBACKFLOW_DAEMON": "off"}
    for debug in ([], ["--debug"]):
        result = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_IMPORTING, *debug,
                                 "toolsets", "list"], capture_output=True, text=True,
                                timeout=120, check=False, env=env)
        if debug:
            assert "Traceback" in result.stderr and "KeyboardInterrupt" in result.stderr
        else:
            assert result.returncode == 130, result.stderr
            assert result.stderr == "interrupted\n", result.stderr
