"""The `sserelay` command: options in, a config, run(), a rendered result, an exit code."""

from __future__ import annotations

from sserelay.cli.commands import main

__all__ = ["main"]
