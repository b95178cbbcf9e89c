"""Where the GLU decode's logits part from the eager ones: the 2-layer synthetic llama3-8b, W4 g128, three decode
steps, eager vs compiled (frozen) with the GLU call off and on; prints each step's max |Δ| / max |ref|.

    python bench/glu_check.py      (on the GPU machine)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


@_cli.one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)  # (--help ran the check: a traceback on a machine without a GPU)
    _cli.needs_cuda(ap, "compares CUDA decodes")
    import torch
    from torch import _dynamo as dynamo

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (tests/ of this checkout)
    from llmcomp.eval import decode_bench as db
    from tests.conftest import static_decode

    model = db.synthetic_model("llama3-8b", layers=2)
    db.quantize_rtn(model, 4, 128)
    ids = torch.randint(0, 128256, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    _, ref, ref_tokens = static_decode(model, ids, steps=3, max_len=40)
    _, again, _ = static_decode(model, ids, steps=3, max_len=40)
    print("eager twice", [float((a.float() - b.float()).abs().max() / b.float().abs().max())
                          for a, b in zip(again, ref)])
    for glu in (False, True):
        for backend in ("eager", "inductor"):
            dynamo.reset()
            with db.compiled_layers(model, backend=backend, glu=glu) as info:
                _, got, tokens = static_decode(model, ids, steps=3, max_len=40)
            errs = [float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, ref)]
            same = all(torch.equal(a, b) for a, b in zip(tokens, ref_tokens))
            print(f"glu={glu} backend={backend} info={info} tokens same={same} errs={errs}")


if __name__ == "__main__":
    main()
