"""``llmcomp linearize``: distil softmax attention into linear attention (Hedgehog, Liger, GLA, Mamba-2 seeding), with hybrids."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.lists import int_list
from llmcomp.cli.pathflag import path_option
from llmcomp.errors import UserError


def parse_tokens(text: str) -> int:
    """``5M`` / ``200k`` / ``1e6`` / ``12345`` → a token count."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:  # (decimal: 4.1M is 4100000, not float's 4099999.9999999995)
        value = Decimal(t[:-1] if scale != 1 else t) * scale
    except InvalidOperation:
        raise UserError(f"--tokens {text!r} is not a token count (e.g. 500k, 5M, 1000000).") from None
    if not value.is_finite() or value < 0:
        raise UserError(f"--tokens must be ≥ 0 (got {text}).")
    if value != value.to_integral_value():  # (0.5 became 0: no fine-tune, silently)
        raise UserError(f"--tokens must be a whole number of tokens (got {text}).")
    return int(value)


def parse_layers(text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    return int_list(text, "--keep-layers", "0,5")  # (an empty list replaced --keep-softmax, silently)


def linearize(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="Llama-style model directory (default: the bundled SmolLM2-135M-Instruct).")] = None,
    output: Annotated[Path, path_option("--output", "-o", help="Artifact directory to write.")] = Path("llmcomp-linear"),
    method: Annotated[str, typer.Option(help="hedgehog (trainable feature maps, LoLCATs hybrid), liger (gates from the key projection, no new parameters), gla (own trainable gate projection) or mamba (Mamba-2 SSD seeded from attention: C=q, B=k, x=v, out=o_proj).")] = "hedgehog",
    window: Annotated[int, typer.Option(help="Sliding-window softmax tokens inside each linear layer; 0 = pure linear attention.")] = 64,
    keep_softmax: Annotated[float, typer.Option("--keep-softmax", help="Fraction of layers kept as softmax attention: those with the largest measured transfer error.")] = 0.0,
    keep_layers: Annotated[Optional[str], typer.Option("--keep-layers", help="Explicit softmax layer indices, e.g. 0,5 (instead of --keep-softmax).")] = None,
    tokens: Annotated[str, typer.Option(help="Fine-tuning token budget (e.g. 500k, 5M; 0 = attention transfer only). Past the end of the bundled text the windows cycle, with a note.")] = "1M",
    transfer_steps: Annotated[int, typer.Option(help="Attention-transfer optimizer steps per layer.")] = 100,
    lr: Annotated[float, typer.Option(help="Fine-tuning peak learning rate (cosine to 10 %).")] = 1e-3,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank on the linearized layers' q/k/v/o.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Windows per fine-tuning step, and per forward pass of the attention transfer's layer-by-layer capture (there the largest divisor of --calib-samples up to it, with a note).")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per window (transfer and fine-tuning).")] = 512,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows for attention transfer.")] = 16,
    checkpoint_every: Annotated[int, typer.Option(help="Fine-tuning steps between checkpoints (a killed run resumes).")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for sampling and initialisation.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="Device (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as float32, float16 or bfloat16 (default: as in the model).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """Distil softmax attention into linear attention; write an artifact that llmcomp.load runs and generates with.

    Attention transfer (each linearized layer learns to match its softmax attention's outputs), then a LoRA
    fine-tune with a KL loss to the original model's logits."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _given, _quiet_transformers, last_stage, run

    _quiet_transformers()

    def go():
        from llmcomp.linearize.distill import LinearizeConfig
        from llmcomp.report.facts import transfer_means

        # (each was taken and ignored: recorded in the manifest, unused)
        stray = _given(ctx, ["lr", "lora_rank", "checkpoint_every"]) if parse_tokens(tokens) == 0 else []
        if stray:
            raise UserError(f"{', '.join(stray)} set the fine-tune, and --tokens 0 runs none.")
        if method == "liger" and _given(ctx, ["transfer_steps"]):
            raise UserError("--transfer-steps trains the student's own parameters, and liger has none (its gates "
                            "come from the key projection).")
        config = LinearizeConfig(method=method, window=window, keep_softmax=keep_softmax,
                                 keep_layers=parse_layers(keep_layers), tokens=parse_tokens(tokens),
                                 transfer_steps=transfer_steps, lr=lr, lora_rank=lora_rank, batch_size=batch_size,
                                 seq_len=seq_len, checkpoint_every=checkpoint_every, seed=seed)
        with render.RichProgress() as progress:
            path = api.linearize(config, output, model, overwrite=overwrite, calib_samples=calib_samples,
                                 calib_seq_len=seq_len, device=device, dtype=dtype, progress=progress)
        stage = last_stage(path)
        m = stage["metrics"]
        means = transfer_means(m["transfer_rel_mse"], stage["layout"], lambda e: f"{100 * e:.1f} %")
        ft = m["finetune"]
        kl = (f"; KL {render.number(ft['kl_first'], 3)} → {render.number(ft['kl_last'], 3)} over {ft['tokens']} "
              "tokens" if ft.get("steps") else "")
        render.wrote(f"{path} ({stage['layout'].count('linear')} linear / {stage['layout'].count('softmax')} softmax "
                     f"layers; mean transfer error {means or '-'}{kl})")

    run(go)
