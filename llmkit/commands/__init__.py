"""The `llmkit` command's sub-commands, one module per concern; `app` is the typer application they register on."""
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llmkit: from raw text to a served chat model.")
