from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Placeholder until the CLI lands."""
    return 0
