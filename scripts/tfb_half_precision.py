"""Why TFB searches a half-precision model in float32: the anchor-NLL change at small sigma, in float32 and in
bfloat16, on an MLE adapter of a calibration grid (SmolLM2 on the CPU)::

    python scripts/tfb_half_precision.py runs/fewshot/runs/mle-arc-e-s1 --dtype bf16

Prints the anchor NLL of the deterministic forward, of the S-sample path at sigma = 0, and its relative change at
sigma = 1e-4 and 1e-3 (TFB's tolerance tau is 0.003). The search itself is not run: ``search_dtype=model`` is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bayeslora.methods import build_method
from bayeslora.models import load_model
from bayeslora.posthoc import load_adapter, resolve_source
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="an MLE run directory")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--anchors", type=int, default=16, help="first N training questions")
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    src = resolve_source(Path(args.run))
    loaded = load_model(src.model, device="cpu", dtype=dtype)
    model = load_adapter(loaded.model, src.adapter_dir).to(dtype).eval()
    scorer = make_scorer(src.format, loaded.tokenizer, max_length=src.max_length)
    examples = load_task(src.dataset, "train", limit=args.anchors)
    n_choices = max(ex.n_choices for ex in examples)
    encoded = [scorer.encode(examples[i:i + 8], n_choices=n_choices) for i in range(0, len(examples), 8)]
    tfb = build_method("tfb", {"search_samples": args.samples, "search_dtype": "model"})
    scales = tfb._reparameterize(model)
    tfb._set_sigma(scales, 0.0)
    with torch.no_grad():
        pseudo = [scorer.choice_logits(model, enc).argmax(-1) for enc in encoded]
    det = tfb._anchor_nll(model, scorer, encoded, pseudo, 0, 7)
    at_zero = tfb._anchor_nll(model, scorer, encoded, pseudo, args.samples, 7)
    print(f"{args.dtype}: anchor NLL {det:.6f} (deterministic), {at_zero:.6f} (S = {args.samples} at sigma 0)")
    for sigma in (1e-4, 1e-3):
        tfb._set_sigma(scales, sigma)
        nll = tfb._anchor_nll(model, scorer, encoded, pseudo, args.samples, 7)
        print(f"  sigma {sigma:g}: anchor NLL {nll:.6f}, relative change {abs(nll - det) / det:.2e}")


if __name__ == "__main__":
    main()
