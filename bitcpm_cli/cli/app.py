"""`bitcpm`: the command map, global options, and the one place errors become exit codes."""

from __future__ import annotations

import os
import traceback

import typer
from typer.core import TyperGroup

from bitcpm_cli import __version__
from bitcpm_cli.cli import compare, convert, env, evaluate, fix_config, infer, quickstart, sft, train
from bitcpm_cli.cli.output import install_readable_metavars, json_printed, json_stdout, print_error, print_json
from bitcpm_cli.core.errors import BitcpmError, CheckFailed

# Exit codes (README, docs/reference.md): 0 done / check passed, 1 check found a problem, 2 could not run (bad
# input), 3 internal error (a bug).
EXIT_CODES: dict[type[BaseException], int] = {CheckFailed: 1, BitcpmError: 2}
INTERNAL_ERROR_EXIT = 3
DEBUG_KEY = "bitcpm.debug"


def exit_code_for(exc: BaseException) -> int:
    return next(code for cls in type(exc).__mro__ if (code := EXIT_CODES.get(cls)) is not None)


def _is_cli_flow(exc: BaseException) -> bool:
    """typer / click control flow (Exit, Abort, usage errors), whichever click the installed typer uses."""
    return isinstance(exc, (typer.Exit, typer.Abort)) or type(exc).__module__.split(".")[0] in ("click", "typer")


class _BitcpmGroup(TyperGroup):
    def invoke(self, ctx: typer.Context):
        as_json = self._json_flag(ctx)
        with json_stdout(as_json):
            return self._invoke(ctx, as_json)

    def _json_flag(self, ctx: typer.Context) -> bool:
        """Whether the command line gives the subcommand its --json flag (not --json as another option's value, e.g.
        `-o --json`; not with --help)."""
        names = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []
        command = self.get_command(ctx, names[0]) if names else None
        takes_value = {name for param in getattr(command, "params", []) if getattr(param, "opts", None)
                       and not getattr(param, "is_flag", False) and not getattr(param, "count", False)
                       for name in param.opts}
        args, index = list(ctx.args), 0
        while index < len(args) and args[index] != "--":
            if args[index] in ("--help", "-h"):
                return False
            if args[index] == "--json":
                return True
            index += 2 if args[index] in takes_value else 1
        return False

    def _invoke(self, ctx: typer.Context, as_json: bool):
        debug = lambda: ctx.meta.get(DEBUG_KEY) or os.environ.get("BITCPM_DEBUG") == "1"  # noqa: E731
        try:
            return super().invoke(ctx)
        except BitcpmError as exc:
            if debug():
                traceback.print_exc()
            code = exit_code_for(exc)
            if as_json and code == 1 and not json_printed():  # a check that failed still reports, as JSON
                print_json({"schema": "bitcpm.check/1", "exit_code": code, "error": exc.message, "hint": exc.hint,
                            "problems": exc.problems or [exc.message]})
            print_error(exc.message, exc.hint, exc.problems)
            raise typer.Exit(code) from None
        except Exception as exc:  # a bug: one line, exit 3, the traceback only when asked for
            if _is_cli_flow(exc):
                raise  # usage errors (exit 2), --help and explicit exits keep typer's handling
            if debug():
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            print_error(f"internal error: {type(exc).__name__}: {first}" if first else
                        f"internal error: {type(exc).__name__}",
                        "this is a bug in bitcpm; rerun with --debug (or BITCPM_DEBUG=1) for the traceback and "
                        "report it")
            raise typer.Exit(INTERNAL_ERROR_EXIT) from None


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
app.command("eval")(evaluate.evaluate)
app.command("train")(train.train)
app.command("sft")(sft.sft)
app.command("quickstart")(quickstart.quickstart)


def main() -> None:
    app(prog_name="bitcpm")
