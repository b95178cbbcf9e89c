"""Per-layer seed sensitivity of VPTQ / PVQ on the bundled model (issue 6: vptq-2 ppl 53.7 on the CPU,
91.8 on an H200). k-means draws its sample and k-means++ init from a ``torch.Generator`` on the layer's
device, and CUDA and CPU generators give different streams for one seed, so a device change acts like
a seed change. This quantizes a few real layers (Hessians from the original model on a few calibration
windows) with several seeds and prints each layer's relative output error tr(DHDᵀ)/tr(WHWᵀ):

    OMP_NUM_THREADS=1 python bench/vq_seeds.py [--device cuda] [--seeds 0 1 2] [--config vptq-2 ...]
                                              [--sample uniform stratified] [--out rows.json]

Run once with ``--device cpu`` and once with ``--device cuda``: if the spread over seeds on one device
covers the CPU/GPU difference, the gap is init luck, not a device bug. ``--sample uniform`` puts back
the former k-means sample (a plain uniform draw) for comparison with the current stratified one.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import llmcomp.quant.kmeans as kmeans_mod
from llmcomp.core import memory
from llmcomp.core.data import calib_windows
from llmcomp.core.model import load_hf, resolve
from llmcomp.core.paths import write_json
from llmcomp.quant.hessian import HessianAccumulator
from llmcomp.quant.pvq import PVQConfig, PVQQuantizer, pyramid_for_bits
from llmcomp.quant.vptq import VPTQConfig, VPTQQuantizer, codebook_for_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

LAYERS = ["model.layers.2.mlp.down_proj", "model.layers.28.mlp.down_proj", "model.layers.0.self_attn.q_proj",
          "model.layers.0.mlp.down_proj", "model.layers.10.self_attn.v_proj", "model.layers.15.mlp.up_proj",
          "model.layers.29.mlp.down_proj"]


def configs() -> dict:
    v2 = VPTQConfig(format=codebook_for_bits(2))
    return {
        "vptq-2": (VPTQQuantizer, v2),
        "vptq-2-it50": (VPTQQuantizer, replace(v2, kmeans_iters=50)),
        "vptq-2-all": (VPTQQuantizer, replace(v2, kmeans_sample=1 << 30)),
        "pvq-had-2": (PVQQuantizer, PVQConfig(format=pyramid_for_bits(2, rotate=True))),
    }


def uniform_sample(x, h, sample, gen):
    """The k-means sample before issue 6: ``sample`` points drawn uniformly, weights unchanged."""
    pick = torch.randperm(x.shape[0], generator=gen, device=x.device)[:sample]
    return x[pick], h[pick]


def hessians(model, tok, names, n_samples, device):
    accs = {n: HessianAccumulator() for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(accs[n]) for n in names]
    with torch.no_grad():
        for w in calib_windows(tok, 512, n_samples):
            model(w[None].to(device))
    for h in hooks:
        h.remove()
    return accs


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", nargs="+", default=["vptq-2"], choices=sorted(configs()))
    ap.add_argument("--calib-samples", type=_cli.count(1), default=16)
    ap.add_argument("--layers", nargs="+", default=LAYERS)
    ap.add_argument("--sample", nargs="+", default=["stratified"], choices=["stratified", "uniform"])
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    _cli.check(ap, memory.check_device, args.device)
    _cli.writable(ap, args.out)
    torch.set_num_threads(1)
    path = resolve(None)
    model, tok = load_hf(path)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bad = [n for n in args.layers if n not in linears]
    if bad:  # (an AttributeError traceback)
        ap.error(f"--layers {bad}: not linear layers of the bundled model (e.g. {LAYERS[0]})")
    model = model.to(args.device)
    accs = hessians(model, tok, args.layers, args.calib_samples, args.device)
    rows = []
    stratified = kmeans_mod._stratified_sample
    for sampling, cname in [(s, c) for s in args.sample for c in args.config]:
        kmeans_mod._stratified_sample = stratified if sampling == "stratified" else uniform_sample
        cls, base = configs()[cname]
        for layer in args.layers:
            errs = []
            for seed in args.seeds:
                cfg = replace(base, seed=seed) if hasattr(base, "seed") and not isinstance(base, PVQConfig) else base
                t = time.perf_counter()
                res = cls(cfg).quantize_linear(layer, model.get_submodule(layer), accs[layer])
                errs.append(res.metrics["out_err_rel"])
                rows.append({"config": cname, "sample": sampling, "layer": layer, "seed": seed, "device": args.device,
                             "out_err_rel": res.metrics["out_err_rel"], "time_s": round(time.perf_counter() - t, 2)})
            spread = (max(errs) - min(errs)) / min(errs)
            print(f"{cname:12s} {sampling:10s} {layer:32s} " + " ".join(f"{e:.5f}" for e in errs)
                  + f"  spread {100 * spread:.1f} %", flush=True)
    kmeans_mod._stratified_sample = stratified
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
