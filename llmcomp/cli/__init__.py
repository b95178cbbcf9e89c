"""The ``llmcomp`` command (``main``; the commands themselves are in ``app``)."""
import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a cancelled CI job, ``scancel``) raised where the command is, as an
    interrupt: a write in progress removes its temporary copy and a calibrated job names the work it kept (the
    default action ended the process there, leaving a full-size hidden folder). Exit 143."""


def _terminate(signum, frame):
    raise Terminated()


def main() -> None:
    """Entry point: an interrupt is one line and exit 130 wherever it lands — while the command line loads, while a
    command imports torch and transformers (typer exits 130 silently there), or in its work (``app.run``)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from llmcomp.cli import render
        from llmcomp.cli.app import app
    except KeyboardInterrupt as exc:
        sys.stderr.write("error: interrupted.\n")
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None
    try:
        app()
    except SystemExit as exc:
        if exc.code in (130, 143) and not render.ERRORS_SHOWN:
            render.error("terminated." if exc.code == 143 else "interrupted.")
        raise
