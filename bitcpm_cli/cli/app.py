"""`bitcpm`: the command map, global options, and the one place errors become exit codes."""

from __future__ import annotations

import os
import traceback

import typer
from typer.core import TyperGroup

from bitcpm_cli import __version__
from bitcpm_cli.cli import compare, convert, env, fix_config, infer, quickstart, sft, train
from bitcpm_cli.cli.output import install_readable_metavars, print_error
from bitcpm_cli.core.errors import BitcpmError, CheckFailed

# Exit codes (README, docs/reference.md): 0 done / check passed, 1 check found a problem, 2 could not run.
EXIT_CODES: dict[type[BaseException], int] = {CheckFailed: 1, BitcpmError: 2}
DEBUG_KEY = "bitcpm.debug"


def exit_code_for(exc: BaseException) -> int:
    return next(code for cls in type(exc).__mro__ if (code := EXIT_CODES.get(cls)) is not None)


class _BitcpmGroup(TyperGroup):
    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except BitcpmError as exc:
            if ctx.meta.get(DEBUG_KEY) or os.environ.get("BITCPM_DEBUG") == "1":
                traceback.print_exc()
            print_error(exc.message, exc.hint, exc.problems)
            raise typer.Exit(exit_code_for(exc)) from None


app = typer.Typer(
    cls=_BitcpmGroup,
    name="bitcpm",
    help="Toolchain for ternary (1.58-bit) LLMs of the BitCPM-CANN family.",
    no_args_is_help=True,
    add_completion=True,  # bitcpm --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

install_readable_metavars()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bitcpm {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (also BITCPM_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    ctx.meta[DEBUG_KEY] = debug


app.command("env")(env.env)
app.command("fix-config")(fix_config.fix_config)
app.command("convert")(convert.convert)
app.command("infer")(infer.infer)
app.command("compare")(compare.compare)
app.command("train")(train.train)
app.command("sft")(sft.sft)
app.command("quickstart")(quickstart.quickstart)


def main() -> None:
    app(prog_name="bitcpm")
