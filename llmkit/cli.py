"""The `llmkit` command: the application (commands in llmkit/commands/) and its one-line error handling."""
from __future__ import annotations

import sys

import typer

from llmkit.commands import app
# importing a module registers its commands; --help lists them in this order
from llmkit.commands import train  # noqa: F401, I001
from llmkit.commands import infer  # noqa: F401
from llmkit.commands import evaluate  # noqa: F401
from llmkit.errors import LlmkitError


def _one_line(message: str) -> str:
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Run the command line; every user error ends as one `error: ...` line on stderr, exit status 1
    (2 for a malformed command line), never a traceback."""
    from typer._click import exceptions as click  # typer >= 0.26 raises its own vendored click's errors

    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(code) comes back as its code
    except click.NoArgsIsHelpError as e:
        e.show()  # a bare `llmkit` or `llmkit train`-like call: the help is the answer
        sys.exit(2)
    except click.ClickException as e:  # typer/click usage errors would print a multi-line box
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        print(f"error: {_one_line(e.format_message())}{where}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except LlmkitError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
