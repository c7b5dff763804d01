"""Fail on secrets committed to the repository.

Scans every file git knows about (tracked, plus new files not ignored) for private keys,
AWS access keys and secret keys, pgbackflow master keys (``pgbackflow-key-v1:<base64>``) and
passwords inside connection URLs. A hit that is a clearly fake test value is allowed by
``allowlist.txt`` next to this script (one ``path-glob<TAB>exact text`` per line, each with
the reason above it). Prints one line per finding and exits 1 when there is any.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess  # nosec B404 - runs git only, with a fixed argument list
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWLIST = Path(__file__).with_name("allowlist.txt")

# Values that stand for a password in documentation rather than being one.
_PLACEHOLDER = re.compile(
    r"^(\$|\{|<|\*+$|x+$|\.\.\.|%|password$|passw(or)?d$|pass$|secret$|pw$|pwd$|PASSWORD|"
    r"changeme$|redacted$|REDACTED|\[)",
    re.IGNORECASE,
)

RULES: list[tuple[str, re.Pattern[str]]] = [
    ("private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    (
        "AWS secret access key",
        re.compile(
            r"(?i)aws_?secret_?(?:access_?)?key['\"]?\s*[:=]\s*['\"]?(?P<value>[A-Za-z0-9/+]{40})"
            r"(?![A-Za-z0-9/+])"
        ),
    ),
    ("pgbackflow master key", re.compile(r"pgbackflow-key-v1:(?P<value>[A-Za-z0-9+/]{40,}={0,2})")),
    (
        "password in a connection URL",
        re.compile(
            r"\b[a-z][a-z0-9+.-]*://[^\s:/@'\"`<>]+:(?P<value>[^\s@/'\"`<>]+)@[^\s/'\"`]"
        ),
    ),
]


def tracked_files() -> list[str]:
    out = subprocess.run(  # nosec B603 B607 - fixed git command, no shell, no input
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def load_allowlist() -> list[tuple[str, str]]:
    entries = []
    for number, line in enumerate(ALLOWLIST.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        glob, sep, text = line.partition("\t")
        if not sep or not text:
            sys.exit(f"{ALLOWLIST}:{number}: expected 'path-glob<TAB>exact text'")
        entries.append((glob, text))
    return entries


def scan(files: list[str], allow: list[tuple[str, str]]) -> list[str]:
    findings = []
    for name in files:
        path = ROOT / name
        if path.is_symlink() or not path.is_file() or path == ALLOWLIST:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        text = data.decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for what, rule in RULES:
                for match in rule.finditer(line):
                    value = match.groupdict().get("value")
                    if value is not None and _PLACEHOLDER.search(value):
                        continue
                    if any(
                        fnmatch.fnmatch(name, glob) and text_ in line for glob, text_ in allow
                    ):
                        continue
                    findings.append(f"{name}:{number}: {what}: {match.group(0)[:60]}")
    return findings


def main() -> int:
    files = tracked_files()
    findings = scan(files, load_allowlist())
    for finding in findings:
        print(f"secret scan: {finding}")
    if findings:
        print(
            f"secret scan: {len(findings)} finding(s): remove the secret (and rotate it), or "
            f"if it is a clearly fake test value add it to {ALLOWLIST.relative_to(ROOT)} "
            "with the reason",
            file=sys.stderr,
        )
        return 1
    print(f"secret scan: {len(files)} files, no secrets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
