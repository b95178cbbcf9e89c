"""GPU check of ``llmcomp export``: load the exports in vLLM (compressed-tensors) and transformers + gptqmodel
(GPTQ) where those are installed, and compare with ``llmcomp.load`` of the same artifact.

    pip install vllm optimum gptqmodel   # whatever installs; each missing tool is reported, not fatal
    python bench/export_vllm.py --out bench/results/export_gpu.json

Per export: max |Δ log-prob| over the prompt tokens (vLLM ``prompt_logprobs``, top-1 entry of the actual
token) and max |Δlogit| (transformers). The artifact: the bundled model, RTN int4 g64 (sym and asym) and NVFP4.
The reference runs in float32 and the other tools in float16, so a small difference is float16 arithmetic;
a layout error shows as differences of order 1 or more. Not run yet (written on a CPU-only machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import llmcomp
from llmcomp import api
from llmcomp.formats import Uniform
from llmcomp.formats.fp4 import NVFP4
from llmcomp.quant import RTNConfig
from llmcomp.quant.fp4 import FP4Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

PROMPT_IDS = list(range(1000, 1064))


def reference_logprobs(art: Path) -> torch.Tensor:
    model = llmcomp.load(art, device="cuda" if torch.cuda.is_available() else None)
    ids = torch.tensor([PROMPT_IDS], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)[:-1]  # position t predicts token t+1
    return logp.gather(1, ids[0, 1:, None]).squeeze(1).cpu(), logits.cpu()


def vllm_logprobs(path: Path) -> torch.Tensor:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(path), dtype="float16", enforce_eager=True, gpu_memory_utilization=0.3)
    out = llm.generate(TokensPrompt(prompt_token_ids=PROMPT_IDS), SamplingParams(max_tokens=1, prompt_logprobs=0))
    entries = out[0].prompt_logprobs[1:]
    return torch.tensor([e[tok].logprob for e, tok in zip(entries, PROMPT_IDS[1:])])


def hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cuda")
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS], device="cuda")).logits[0].float().cpu()


@_cli.one_line_errors
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_gpu.json"))
    args = ap.parse_args()
    _cli.writable(ap, args.out)  # (a bad --out was a traceback after every export had run)
    rows = []
    configs = {"w4g64-sym": RTNConfig(format=Uniform(4, 64, True)), "w4g64-asym": RTNConfig(format=Uniform(4, 64)),
               "nvfp4": FP4Config(format=NVFP4())}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, cfg in configs.items():
            art = api.quantize(cfg, tmp / name)
            ref_lp, ref_logits = reference_logprobs(art)
            for to, check in (("compressed-tensors", "vllm"), ("gptq", "transformers")):
                row = {"artifact": name, "export": to, "loader": check}
                try:
                    out = tmp / f"{name}-{to}"
                    api.export(art, to, out)
                    if check == "vllm":
                        row["max_abs_dlogprob"] = (vllm_logprobs(out) - ref_lp).abs().max().item()
                    else:
                        row["max_abs_dlogit"] = (hf_logits(out) - ref_logits).abs().max().item()
                except Exception as exc:  # a missing tool or a refusal is a result too
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    row["trace"] = traceback.format_exc(limit=3)
                print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompt_tokens": len(PROMPT_IDS), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
