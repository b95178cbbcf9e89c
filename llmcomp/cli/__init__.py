"""The ``llmcomp`` command (``main``; the commands themselves are in ``app``)."""
import sys


def main() -> None:
    """Entry point: an interrupt is one line and exit 130 wherever it lands — while the command line loads, while a
    command imports torch and transformers (typer exits 130 silently there), or in its work (``app.run``)."""
    try:
        from llmcomp.cli import render
        from llmcomp.cli.app import app
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted.\n")
        raise SystemExit(130) from None
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130 and not render.ERRORS_SHOWN:
            render.error("interrupted.")
        raise
