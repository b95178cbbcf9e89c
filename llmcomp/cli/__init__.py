"""The ``llmcomp`` command (``main``; the commands themselves are in ``app``)."""
import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a cancelled CI job, ``scancel``) raised where the command is, as an
    interrupt: a write in progress removes its temporary copy and a calibrated job names the work it kept (the
    default action ended the process there, leaving a full-size hidden folder). Exit 143."""


TERMINATED: list = []  # non-empty once SIGTERM came: an interrupt typer took (exit 130) was this one


def _terminate(signum, frame):
    TERMINATED.append(signum)
    raise Terminated()


MAIN: list = []  # non-empty in the ``llmcomp`` process (not where a test or a library runs the app in-process)


def finished() -> None:
    """The command has ended (its output published, its last line printed); the interpreter then frees the model
    (~1 s for the bundled one), and a Ctrl-C there killed the process by SIGINT, silently (exit −2, for a command
    that had succeeded). Its exit code stands: an interrupt now is ignored, and SIGTERM takes its default action
    (``Terminated`` raised in the teardown printed a traceback). Only in the process ``main`` runs as the console
    script (in-process callers use the typer app, e.g. typer's CliRunner, which leaves their handlers alone)."""
    if MAIN:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main() -> None:
    """Entry point: an interrupt is one line and exit 130 (SIGTERM: 143) wherever it lands — while the command line
    loads, while a command imports torch and transformers (typer exits 130 silently there, or fails building the
    command tree), or in its work (``app.run``)."""
    MAIN.append(True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # (not over a parent's `trap '' TERM`)
        signal.signal(signal.SIGTERM, _terminate)
    try:
        from llmcomp.cli import render
        from llmcomp.cli.app import app
    except KeyboardInterrupt:
        sys.stderr.write(f"error: {'terminated' if TERMINATED else 'interrupted'}.\n")
        raise SystemExit(143 if TERMINATED else 130) from None
    try:
        app()
    except KeyboardInterrupt:  # (outside typer's own handling: while it builds the command tree)
        code = 143 if TERMINATED else 130
    except SystemExit as exc:
        if exc.code not in (130, 143):
            finished()
            raise
        code = 143 if TERMINATED else exc.code
    else:
        finished()
        return
    if not render.ERRORS_SHOWN:
        render.error("terminated." if code == 143 else "interrupted.")
    raise SystemExit(code) from None
