"""llmcomp: compress and convert large language models into one verified artifact format."""
__version__ = "0.1.0"

# The public names load on first use (PEP 562): `import llmcomp` and the command line's first instant stay light, so
# an interrupt then is the command's one line instead of a traceback from inside torch's import.
_EXPORTS = {
    "load": "llmcomp.api", "quantize": "llmcomp.api", "evaluate": "llmcomp.api", "inspect": "llmcomp.api",
    "UserError": "llmcomp.errors", "Uniform": "llmcomp.formats", "RTNConfig": "llmcomp.quant",
    "PRESETS": "llmcomp.quant.presets",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    import importlib

    if name not in _EXPORTS:  # a subpackage (llmcomp.api, llmcomp.quant, ...), as the eager import made them
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'llmcomp' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
