"""What produced a reported number: library versions and the project's git commit, stored next to every result."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

from .redaction import redact_command

LIBRARIES = ("hpt-trl", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape a run (`None` where one is not installed), and Python's."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | None = None) -> str | None:
    """The commit of the checkout holding `path` (this package by default), with `+dirty` if it has uncommitted
    changes; `None` outside a git checkout."""
    folder = os.path.dirname(os.path.abspath(path or __file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty.strip() else "")


def provenance(command: list[str] | None = None) -> dict:
    """`{"command", "commit", "versions"}` for a results file."""
    return {
        "command": " ".join(redact_command(command if command is not None else sys.argv)),
        "commit": git_commit(),
        "versions": library_versions(),
    }

