"""The `kvedge` command: a Typer app over kvedge.api."""

from .app import app, main

__all__ = ["app", "main"]
