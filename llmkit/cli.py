"""The `llmkit` command: one sub-command per verb, each a thin wrapper over the library."""
from __future__ import annotations

import sys

import typer

from llmkit.errors import LlmkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llmkit: from raw text to a served chat model.")


def main() -> None:
    try:
        app()
    except LlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
