"""The sequential layer-by-layer calibration driver shared by every calibrated method.

1. Run the model on the calibration batches, stopping at the first decoder layer, to capture its
   inputs; the keyword arguments every layer receives (masks, rotary embeddings) are captured once
   from a full forward of the first batch, per layer (sliding/full attention layers differ).
2. For each layer in order: move it to the work device, let the handler observe it (hooks on any
   submodule while the layer runs over all captured inputs) and replace pieces of it, then run the
   *modified* layer to produce the next layer's inputs — so later layers calibrate against the
   errors of earlier ones.
Peak memory on the work device ≈ one layer + its method's statistics + the calibration activations;
with ``offload_activations`` the activations stay on the model's home device and move per batch.
A CUDA out-of-memory names the layer (``core/memory.py``), inside or outside a ``--max-memory`` cap.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from llmcomp.core import memory
from llmcomp.core.hfcompat import CACHE_KWARGS
from llmcomp.core.model import decoder_layers
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class LayerRunner:
    """Runs one decoder layer over every captured input batch, optionally with observing hooks.

    ``device``: where the layer runs; inputs stored elsewhere (offloaded activations) move there one
    batch at a time and outputs move back to where the inputs were."""

    def __init__(self, layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device=None):
        self.layer, self.inputs, self.kwargs, self.device = layer, inputs, kwargs, device

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.device is None or x.device == torch.device(self.device):
            return _first(self.layer(x, **self.kwargs))
        return _first(self.layer(x.to(self.device), **self.kwargs)).to(x.device)

    @torch.no_grad()
    def run(self, hooks: Optional[dict[nn.Module, Callable]] = None, batches: Optional[int] = None,
            keep_outputs: bool = True) -> Optional[list[torch.Tensor]]:
        """Run the layer over the captured inputs (the first ``batches`` of them, if given). Returns the
        outputs, or None with ``keep_outputs=False`` (a pass run only for its hooks holds no outputs)."""
        handles = [m.register_forward_hook(fn) for m, fn in (hooks or {}).items()]
        try:
            if not keep_outputs:
                for x in self.inputs[:batches]:
                    self._forward(x)
                return None
            return [self._forward(x) for x in self.inputs[:batches]]
        finally:
            for h in handles:
                h.remove()


LayerHandler = Callable[[str, nn.Module, LayerRunner], None]


def equal_batch(n: int, batch_size: int) -> int:
    """The batch size calibration runs: the largest divisor of ``n`` samples up to ``batch_size`` (equal
    batches, so the masks captured from the first batch fit every batch)."""
    return max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)


def note_equal_batch(flag: str, batch_size: int, n: int, note, where: str = "") -> int:
    """``equal_batch``, with a note where it is neither the batch asked for nor all ``n`` samples: a lowered batch
    was silent (``where`` names the work it applies to, when the flag sets other work too)."""
    runs = equal_batch(n, batch_size)
    if runs != min(batch_size, n):
        note(f"{flag} {batch_size} runs as {runs}{where}: batches are equal-sized, and {runs} is the largest divisor "
             f"of --calib-samples {n} up to it.")
    return runs


def _check_fits(first: torch.Tensor, n: int, bs: int, seq_len: int, copies: int = 2) -> None:
    """A layer's captured inputs and its outputs are held together: two copies of every window's hidden states,
    or ``copies`` where the handler holds more of them. Checked from the first batch's capture, before the rest is."""
    per = first.numel() * first.element_size()
    held = "twice" if copies == 2 else f"{copies} times"
    memory.check_fits(copies * per * (n // bs) - per,
                      f"Calibration's activations ({n} windows × {seq_len} tokens × {first.shape[-1]} "
                      f"{str(first.dtype).removeprefix('torch.')} values, held {held})",
                      "lower --calib-samples or --seq-len")


@torch.no_grad()
def calibrate_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    handler: LayerHandler,
    batch_size: int = 8,
    device: Optional[torch.device | str] = None,
    progress: Progress = NULL,
    offload_activations: Optional[bool] = None,
    reach: Optional[Iterable[str]] = None,
    copies: int = 2,
    remedy: str = memory.CALIBRATION_REMEDY,
) -> None:
    """Walk ``model``'s decoder layers in order, calling ``handler(path, layer, runner)`` for each — with ``reach``
    (the names of the modules the handler works on), up to the last layer holding one of them: the layers after it
    have nothing to calibrate, and ran forward for nothing.

    ``input_ids``: int64 [n, seq_len]. Batches are equal-sized (``batch_size`` is reduced to a divisor
    of ``n``) so the captured masks fit every batch. ``device``: where layers and activations live
    while a layer is processed (default: the device of the model's first parameter).
    ``offload_activations``: keep the captured activations on the model's home device and move them to
    ``device`` one batch at a time (bit-identical results, less device memory); default: when a
    ``--max-memory`` GPU cap is active on ``device`` (``core/memory.py``).
    ``copies``: how many copies of every window's hidden states are held at once, for the CPU memory check (2:
    a layer's inputs and outputs; a handler that keeps per-window captures of its own holds more).
    ``remedy``: what the out-of-memory error tells the user to do, in the command's own flags.
    """
    prefix, layers = decoder_layers(model)
    n = input_ids.shape[0]
    bs = equal_batch(n, batch_size)
    first_param = next(model.parameters())
    device = torch.device(device) if device is not None else first_param.device
    home = first_param.device
    if offload_activations is None:
        offload_activations = memory.active_cap(device) is not None
    store = home if offload_activations else device

    # Per-layer kwargs (masks, rotary embeddings) from the first batch, and layer 0's inputs for every
    # batch. Each layer's forward is temporarily replaced by a recorder that passes its input through,
    # so the capture costs the embeddings only, not a full forward.
    layer_kwargs: list[dict] = [{} for _ in layers]
    hidden: list[torch.Tensor] = []
    first_batch = [True]

    def recorder(i):
        def forward(*args, **kwargs):
            x = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise UserError(f"Unsupported decoder layer {type(layers[i]).__name__}: positional arguments "
                                "besides the hidden states.")
            if first_batch[0]:
                kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", *CACHE_KWARGS)}
                kw["use_cache"] = False
                layer_kwargs[i] = _to(kw, device)
            if i == 0:
                hidden.append(_to(x, store))
            if i == len(layers) - 1 or not first_batch[0]:
                raise _Stop
            return x
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for batch in progress.track(input_ids.split(bs), "Capturing layer inputs"):
            try:
                model(input_ids=batch.to(home), use_cache=False)
            except _Stop:
                pass
            except torch.cuda.OutOfMemoryError:
                raise memory.out_of_memory("Capturing the calibration inputs", device, remedy) from None
            if first_batch[0] and torch.device(store).type == "cpu":
                _check_fits(hidden[0], n, bs, input_ids.shape[1], copies)
            first_batch[0] = False
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward

    count = len(layers)
    if reach is not None:
        names = list(reach)
        count = 1 + max((i for i in range(count) if any(n.startswith(f"{prefix}.{i}.") for n in names)), default=-1)
    task = progress.task("Calibrating layers", count)
    for i, layer in enumerate(layers[:count]):
        try:
            layer.to(device)
            runner = LayerRunner(layer, hidden, layer_kwargs[i], device)
            handler(f"{prefix}.{i}", layer, runner)
            hidden = runner.run()
            del runner
        except torch.cuda.OutOfMemoryError:
            raise memory.out_of_memory(f"Decoder layer {prefix}.{i}", device, remedy) from None
        layer.to(home)
        progress.advance(task)
    progress.done(task)
