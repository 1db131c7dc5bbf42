"""What the command-line tests check again and again: a command's exit status and output, the
one-line error contract, and whether a folder's files changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pocketlm.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``pocketlm ARGS`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, no traceback, and exactly one error line, the last (progress lines before it are
    fine), holding every needle. Returns the line."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("pocketlm: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def tree_digest(path: Path) -> str:
    """One SHA-256 of every file's relative name and bytes below ``path``."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()
