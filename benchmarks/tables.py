"""What the benchmarks' results tables share."""

from __future__ import annotations


def provenance_line(result: dict) -> str:
    """One markdown line for a results table: "Commit `abc1234`; python 3.11, torch 2.x, ..." from the fields of
    `hpt_trl.provenance.provenance()` in `result`."""
    versions = ", ".join(f"{name} {version}" for name, version in (result.get("versions") or {}).items() if version)
    return f"Commit `{result.get('commit')}`; {versions}."
