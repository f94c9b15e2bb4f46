"""The ``edgeexit`` command line.

Device commands (``run``, ``info``, ``bench``, ``tune``, ``compare``) need only the device install. Workstation
commands (``train``, ``sweep``, ``convert``) live in :mod:`edgeexit.workstation.cli.train` and :mod:`edgeexit.workstation.cli.convert` and are imported only when
they are invoked, so ``edgeexit --help`` and the device commands never load torch or TensorFlow.

Every :class:`~edgeexit.errors.EdgeExitError` becomes one line ``error: ...`` on stderr and the error's
exit code; no traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from ..errors import EdgeExitError, UsageError, printable

log = logging.getLogger("edgeexit")

# name -> ("module:attribute", one-line help). The help is here so that listing commands imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("edgeexit.workstation.cli.train:train", "Train an early-exit network (workstation, needs torch)."),
    "sweep": ("edgeexit.workstation.cli.train:sweep", "Train one network per lambda and tabulate accuracy vs cost (workstation)."),
    "post-train": ("edgeexit.workstation.cli.posttrain:post_train",
                   "Attach early exits to a trained, frozen network and train only the exits (workstation)."),
    "convert": ("edgeexit.workstation.cli.convert:convert", "Convert a trained network into an int8 TFLite bundle (workstation)."),
    "run": ("edgeexit.cli.device:run", "Classify images with a bundle: label, exit, MACs, latency, energy."),
    "info": ("edgeexit.cli.device:info", "Show a bundle's stages, costs, thresholds and verification report."),
    "bench": ("edgeexit.cli.bench:bench", "Benchmark a bundle on a labelled dataset against the monolithic model."),
    "tune": ("edgeexit.cli.tune:tune", "Search per-exit thresholds for an accuracy or budget target."),
    "compare": ("edgeexit.cli.compare:compare", "Compare bench results of one bundle from several boards side by side."),
    "sign": ("edgeexit.cli.sign:sign", "Sign a bundle's manifest with an Ed25519 private key (manifest.sig)."),
    "keygen": ("edgeexit.cli.sign:keygen", "Create an Ed25519 key pair for signing bundles."),
    "serve": ("edgeexit.cli.serve:serve",
              "Serve a bundle's stages after K to boards that offload hard inputs (KServe v2; the server extra)."),
}

WORKSTATION_FIX = ("on a workstation, run `bash scripts/env.sh workstation` in an edgeexit checkout and use "
                   ".venv/bin/edgeexit (see README); device installs run run, info, bench, tune and compare")
WORKSTATION_HINT = f"this command needs the workstation install (torch, TensorFlow, onnx2tf): {WORKSTATION_FIX}"


class Interrupted(Exception):
    """Ctrl-C (SIGINT) while a command ran."""


#: What a Ctrl-C prints (exit code 130). Bundles, manifests, signatures and checkpoints are written aside and
#: renamed into place, so an interrupted command leaves them whole: as they were, or complete.
INTERRUPTED = "error: interrupted"


#: Commands that need torch, TensorFlow and onnx2tf (the workstation install).
WORKSTATION_COMMANDS = ("train", "sweep", "post-train", "convert")
#: The top-level packages of the workstation install; a device install has none of them.
WORKSTATION_PACKAGES = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime")


def _require_workstation(name: str, missing: str | None = None) -> None:
    """UsageError (exit 2, one line) when a workstation command runs where torch is not installed."""
    if missing is None:
        missing = "torch" if importlib.util.find_spec("torch") is None else None
    if missing is not None:
        raise UsageError(f"'edgeexit {name}' needs the workstation install and {missing} is not installed here; "
                         f"{WORKSTATION_FIX}")


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                            list[str]]:
        name = args[0] if args else ""
        if name and name not in COMMANDS and not name.startswith("-"):
            from .options import did_you_mean

            ctx.fail(f"no command {name!r}; the commands are {', '.join(COMMANDS)}{did_you_mean(name, COMMANDS)}")
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if name in WORKSTATION_COMMANDS:
            _require_workstation(name)
        module_name, attr = COMMANDS[name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing.split(".")[0] in WORKSTATION_PACKAGES:
                _require_workstation(name, missing)
            raise
        return getattr(module, attr)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before click turns it into Abort (which a closed stdin also raises)
            raise Interrupted() from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # `edgeexit --help` lists commands from COMMANDS, importing nothing.
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])



@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeexit", message="edgeexit %(version)s")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr; no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """edgeexit: early-exit neural networks on edge devices.

    Workstation: train -> convert.  Device: run, info, bench, tune, compare.
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet


def entry_point(argv: list[str] | None = None) -> None:
    """Console-script entry: one-line errors, documented exit codes, never a traceback for user errors."""
    from ..runtime.interpreter import cli_owns_stderr

    cli_owns_stderr()
    try:
        rv = main.main(args=argv, prog_name="edgeexit", standalone_mode=False)
    except EdgeExitError as exc:
        click.echo(f"error: {printable(exc, 1000)}", err=True)
        sys.exit(exc.exit_code)
    except Interrupted:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except click.exceptions.Abort as exc:
        click.echo(INTERRUPTED if isinstance(exc.__context__, KeyboardInterrupt) else "error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # bad options and arguments: click's own one-line message
        click.echo(f"error: {printable(exc.format_message(), 1000)}", err=True)
        sys.exit(UsageError.exit_code)
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        # a workstation package imported while a workstation command runs on a device install
        if (exc.name or "").split(".")[0] not in WORKSTATION_PACKAGES:
            _internal_error(exc)
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in COMMANDS), "")
        click.echo(f"error: {'edgeexit ' + command if command else 'this command'} needs the workstation install "
                   f"and {exc.name} is not installed here; {WORKSTATION_FIX}", err=True)
        sys.exit(UsageError.exit_code)
    except Exception as exc:  # a defect, not a user error: still one line; -vv logs the traceback
        _internal_error(exc)
    sys.exit(rv if isinstance(rv, int) else 0)


def _internal_error(exc: BaseException) -> None:
    log.debug("internal error", exc_info=True)
    click.echo(f"error: internal error ({type(exc).__name__}: {printable(exc, 200)}); please report it with the "
               "output of the same command run with -vv", err=True)
    sys.exit(70)


if __name__ == "__main__":  # python -m edgeexit.cli.main (or python -m edgeexit)
    entry_point()
