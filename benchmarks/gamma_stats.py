"""Where gamma migration can pay (issue 4): per LayerNorm, what migrating its gamma does to the tensor that gets quantized.

Outlier Suppression's gamma migration quantizes ``h' = h / gamma`` instead of ``h = LN(x)`` and
moves gamma into the next weights. It helps when gamma is large on the outlier channels; when
gamma is below 1 on the wide channels, ``h'`` is wider than ``h`` for the same spread. For each
LayerNorm of the subject this prints, over the real (unpadded) tokens of the 64 calibration
sentences: gamma's range, ``h`` and ``h'`` absmax and RMS, and the readers' output error after
fake quantization at ``--bits`` (per-tensor activation, per-column weight, the score smoothquant's
alpha search uses) with migration divided by without (< 1: migration lowers it).

    python benchmarks/gamma_stats.py --subject minilm_l3 --bits 8 6
    python benchmarks/gamma_stats.py --subject minilm_l6 --bits 8 6

Data: ``benchmarks/work/outliers/<subject>/calib_64.npz`` (written by ``outliers_compare.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ogt  # noqa: E402
from ogt.graph.patterns import layernorms  # noqa: E402
from ogt.graph.query import GraphIndex  # noqa: E402
from ogt.quant.tokens import real_tokens, token_mask  # noqa: E402
from ogt.testing.equivalence import Runner  # noqa: E402
from ogt.transforms._rescale import Reject, classify_readers, glob_excluder, layernorm_params, weight_channels  # noqa: E402
from ogt.transforms.smoothquant import quantized_error  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subject", default="minilm_l3")
    ap.add_argument("--bits", nargs=2, type=int, default=(8, 6), metavar=("W", "A"))
    args = ap.parse_args()
    data = ROOT / f"benchmarks/work/outliers/{args.subject}/calib_64.npz"
    if not data.exists():
        sys.exit(f"no {data}: run benchmarks/outliers_compare.py first")
    model = ogt.load(ROOT / f".cache/models/{args.subject}.onnx")
    idx = GraphIndex(model.graph)
    batch = dict(np.load(data))
    mask = token_mask(batch)
    lns = list(layernorms(idx, model.array))
    values = Runner(model, [ln.output for ln in lns])(batch)
    w_bits, a_bits = args.bits
    print(f"{args.subject}, W{w_bits}A{a_bits}, {int(mask.sum()) if mask is not None else '?'} real tokens")
    print("| LayerNorm output | gamma min..max | h absmax / RMS | h' absmax / RMS | readers' error, migrated / not |")
    print("|---|---|---|---|---:|")
    for ln in lns:
        try:
            readers = classify_readers(idx, ln.output, glob_excluder(()))
        except Reject:
            continue
        h = real_tokens(values[ln.output], mask).reshape(-1, values[ln.output].shape[-1]).astype(np.float64)
        gamma, _, _ = layernorm_params(model, idx, ln, h.shape[1])
        g = np.where(np.abs(gamma) >= 1e-2, gamma, 1.0)  # migrate-gamma's min_abs_gamma guard
        hp = h / g
        ratio = "-"
        if readers.linear:
            ws = [weight_channels(model, idx, lin) for lin in readers.linear]
            rows = h.astype(np.float32)
            absmax = np.abs(h).max(axis=0)
            before, after = (quantized_error(rows, ws, absmax, s, None, w_bits, a_bits) for s in (np.ones_like(g), g))
            ratio = f"{after / before:.2f}"
        print(f"| `{ln.output[-50:]}` | {gamma.min():.2f}..{gamma.max():.2f} | {np.abs(h).max():.1f} / "
              f"{np.sqrt((h**2).mean()):.2f} | {np.abs(hp).max():.1f} / {np.sqrt((hp**2).mean()):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
