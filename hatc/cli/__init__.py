"""The ``hatc`` command line: thin typer commands over the library.

Conventions for every command: results on stdout, progress and logs on
stderr; ``--json`` prints one compact JSON object on one line; exit 0 on
success, 2 on bad input (a HatcError: one line, no traceback), 1 otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from hatc.cli import arch, data, keys, search, targets, train, translate
from hatc.cli import compile as compile_cli
from hatc.cli import latency as latency_cli
from hatc.cli import quickstart as quickstart_cli
from hatc.cli import rpc as rpc_cli
from hatc.cli import tune as tune_cli
from hatc.cli.common import fail
from hatc.errors import HatcError

app = typer.Typer(
    name="hatc",
    help="Hardware-Aware Transformers: search, train, measure and compile translation models for real devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(arch.app, name="arch")
app.add_typer(latency_cli.app, name="latency")
app.command("targets")(targets.list_targets)
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(rpc_cli.app, name="rpc")
app.add_typer(keys.app, name="keys")
app.command("compile")(compile_cli.compile_command)
app.command("tune")(tune_cli.tune_command)
app.command()(translate.translate)
app.command()(translate.evaluate)
app.command()(search.search)
app.command("quickstart")(quickstart_cli.quickstart)


def _click_exceptions() -> Any:
    """typer's vendored click exceptions (a private module: typer >= 0.29 vendors click and
    exports no public name for usage errors). The one place hatc touches it; an upgrade that
    moves it fails here, loudly, and tests/test_private_apis.py says so."""
    from typer._click import exceptions

    return exceptions


def main() -> None:
    click_exceptions = _click_exceptions()
    try:
        # standalone_mode=False lets usage errors reach us, so they too are one line.
        code = app(standalone_mode=False)
    except HatcError as e:
        fail(str(e), code=e.exit_code)
    except click_exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        code = 0
    except click_exceptions.ClickException as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail(e.format_message() + hint, code=e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
