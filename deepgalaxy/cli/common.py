"""Shared CLI pieces: the root app, the console, a default-subcommand group, friendly errors, deprecated spellings."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

try:  # typer >= 0.29 does without click; mlflow still installs it
    import click
except ImportError:  # pragma: no cover
    click = None  # type: ignore[assignment]

from deepgalaxy import __version__
from deepgalaxy.core.errors import DeepGalaxyError, PluginWarning
from deepgalaxy.core.workers import NETWORK_INTERFACE_ENV, SSH_IDENTITY_FILE_ENV, SSH_PORT_ENV, host_access

# Piped output (files, CI logs) gets a wide console instead of rich's 80 columns, so tables stay readable.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)


class DefaultGroup(typer.core.TyperGroup):
    """A group whose first argument runs the ``list`` command unless it names a subcommand.

    ``deepgalaxy models`` and ``deepgalaxy models 'vae-*'`` list cards; ``deepgalaxy models show X`` shows one.
    """

    default_command = "list"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _version(value: bool) -> None:
    if value:
        console.print(f"deepgalaxy {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="deepgalaxy",
    help="Learn the physics of colliding galaxies from images: simulate, train, register, search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version."),
) -> None:
    """deepgalaxy: merger-stage classification, latent similarity search and tracked experiments."""


def _quiet_mlflow_logs() -> None:
    """MLflow logs at WARNING unless MLFLOW_LOGGING_LEVEL says otherwise (read when mlflow is imported; set on its
    logger too when it already is, as in tests that call :func:`run_cli` in-process)."""
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", MLFLOW_LOG_LEVEL)
    if "mlflow" in sys.modules:
        import logging

        logging.getLogger("mlflow").setLevel(level.upper())


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """A SIGTERM handler for the long-running commands (``server``, ``serve``): stop as on Ctrl-C."""
    raise KeyboardInterrupt


class Interrupted(Exception):
    """Ctrl-C during a command that can be resumed: the CLI prints the message and exits with 130."""


@contextlib.contextmanager
def resumable(what: str) -> Iterator[None]:
    """Turn Ctrl-C inside the block into :class:`Interrupted`, saying what stopped and that the command resumes."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {what}; what is finished is kept: run the same command again to "
                          "resume") from None


PROG = "deepgalaxy"
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""

MLFLOW_LOG_LEVEL = "WARNING"
"""MLflow's own INFO lines ("Creating initial MLflow database tables...") would break the one-line errors."""


def _classes(*candidates: object) -> tuple[type[BaseException], ...]:
    return tuple(dict.fromkeys(c for c in candidates if isinstance(c, type) and issubclass(c, BaseException)))


# typer 0.29 vendors click and raises its own classes (typer._click.exceptions.*); older typer raises click's.
_click = getattr(click, "exceptions", None)
_EXITS = _classes(getattr(typer, "Exit", None), getattr(_click, "Exit", None))
_ABORTS = _classes(getattr(typer, "Abort", None), getattr(_click, "Abort", None))
_CLI_ERRORS = _classes(getattr(typer, "TyperException", None), getattr(_click, "ClickException", None))


def one_line(text: str) -> str:
    """``text`` with its lines joined: the CLI's errors are one line each."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, one line, the message printed literally (no rich markup)."""
    err_console.print(Text.assemble(("error:", "red"), " ", one_line(message)), highlight=False, soft_wrap=True)


def _usage_error(exc: BaseException) -> int:
    """A click/typer error as one line naming the command's help; the help itself when no arguments were given."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        console.print(ctx.get_help(), highlight=False, markup=False, soft_wrap=True)
        return 0
    message = one_line(exc.format_message() if hasattr(exc, "format_message") else str(exc))
    if ctx is not None:
        message = f"{message.rstrip('.')}. See `{ctx.command_path} --help`."
    print_error(message)
    return int(getattr(exc, "exit_code", 2) or 2)


_python_show_warning = warnings.showwarning


def print_warning(message: str) -> None:
    """``warning: MESSAGE`` on stderr, one line, the message printed literally."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", one_line(message)), highlight=False, soft_wrap=True)


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """deepgalaxy's own warnings as ``warning: MESSAGE`` on one line; any other warning as Python shows it."""
    if issubclass(category, PluginWarning):
        print_warning(str(message))
    else:
        _python_show_warning(message, category, *args, **kwargs)


# --- spellings kept one release after a rename ------------------------------------------------------------------

_deprecations: list[str] = []
"""Deprecated spellings the running command was given: :func:`run_cli` warns after the command ran, so that a usage
error or a failure stays one line."""


def _deprecated(old: str, new: str) -> None:
    _deprecations.append(f"{old} is deprecated and will be removed in the next release: use {new}")


def deprecated_command(command: Callable[..., Any], old: str, new: str) -> Callable[..., Any]:
    """``command`` under its old spelling ``old``: the same parameters, one warning line naming the new spelling
    ``new`` (``"latent search"``) once it ran. Register it with ``hidden=True``."""

    @functools.wraps(command)
    def alias(**kwargs: Any) -> Any:
        _deprecated(f"`{PROG} {old}`", f"`{PROG} {new}`")
        return command(**kwargs)

    return alias


def deprecated_option(*decls: str, new: str, meaning: str, **checks: Any) -> Any:
    """A hidden option under its old spelling ``decls`` (``"--version", "-V"``) for what option ``new`` now sets;
    when given, one warning line naming ``new`` once the command ran, and the command uses its value
    (:func:`given`). ``checks``: the value checks the old spelling had (``min=1``)."""

    def warn(value: Any) -> Any:
        if value is not None:
            _deprecated(f"{'/'.join(decls)} for the {meaning}", new)
        return value

    return typer.Option(None, *decls, hidden=True, callback=warn, help=f"deprecated spelling of {new}", **checks)


def given(new: Any, old: Any) -> Any:
    """The value of an option renamed by :func:`deprecated_option`: the old spelling's when it was given."""
    return new if old is None else old


def run_cli(application: typer.Typer, args: list[str] | None = None) -> int:
    """Run the app and return the exit code: 2 and one line for a usage error or a DeepGalaxyError, 130 after
    Ctrl-C, never a traceback for anything the user can fix; a deprecated spelling warns in one line after the
    command ran."""
    _quiet_mlflow_logs()
    _deprecations.clear()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            result = application(args=args, prog_name=PROG, standalone_mode=False)
    except DeepGalaxyError as exc:
        print_error(str(exc))
        return 2
    except Interrupted as exc:
        print_error(str(exc))
        return INTERRUPTED
    except _EXITS as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _ABORTS:
        print_error("aborted")
        return INTERRUPTED
    except _CLI_ERRORS as exc:
        return _usage_error(exc)
    if result == INTERRUPTED:  # typer turns a KeyboardInterrupt into exit code 130, silently
        print_error("interrupted")
    for note in _deprecations:
        print_warning(note)
    return result if isinstance(result, int) else 0


def nic_option() -> Any:
    """``--network-interface`` of the commands that launch ranks on ``--hosts``."""
    return typer.Option(None, "--network-interface", envvar=NETWORK_INTERFACE_ENV,
                        help="with --hosts: the network interface(s) the ranks talk over, present on this machine "
                        "and every host (e.g. eth0 or ib0; comma-separated for several)")


def ssh_port_option() -> Any:
    """``--ssh-port`` of the commands that launch ranks on ``--hosts``."""
    return typer.Option(None, "--ssh-port", envvar=SSH_PORT_ENV, min=1, max=65535,
                        help="with --hosts: the sshd port of every host (default ssh's, 22)")


def ssh_key_option() -> Any:
    """``--ssh-identity-file`` of the commands that launch ranks on ``--hosts``."""
    return typer.Option(None, "--ssh-identity-file", envvar=SSH_IDENTITY_FILE_ENV,
                        help="with --hosts: the private key that logs in to every host (ssh -i)")


def use_host_access(network_interface: str | None, ssh_port: int | None, ssh_identity_file: str | None) -> None:
    """Hand the host options to the launcher, which reads them (also for ``--resume``) from ``DEEPGALAXY_*``;
    checked now, before anything is written or launched."""
    for name, value in ((NETWORK_INTERFACE_ENV, network_interface), (SSH_PORT_ENV, ssh_port),
                        (SSH_IDENTITY_FILE_ENV, ssh_identity_file)):
        if value is not None:
            os.environ[name] = str(value)
    host_access(os.environ)


def device_option(default: str | None = None, keeps: str = "") -> Any:
    """``--device`` of the commands that train or run a model; ``keeps`` says what None (not given) keeps."""
    return typer.Option(default, "--device", help="auto, cpu, cuda or cuda:N; auto: the GPU of this rank's local rank "
                        "when a GPU is visible, else the CPU (cuda where none is visible is an error)" + keeps)


def precision_option(default: str | None = None, keeps: str = "") -> Any:
    """``--precision`` of the commands that train or run a model; ``keeps`` says what None (not given) keeps."""
    return typer.Option(default, "--precision", help="auto, fp32, bf16 or fp16; auto: bf16 where the device does it "
                        "natively (a GPU from Ampere on, a CPU with AVX-512 BF16, AMX or Arm BF16), else fp32; fp16 "
                        "only on a GPU (with a loss scaler when training)" + keeps)
