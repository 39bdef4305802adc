"""Noisy bias (issue 5): how much can any noise of the searched family move the *end* metric?

``noisy_bias_compare.py`` measures ogt's search (block objective, 16 + 16 samples). This script
asks the question under it: for each noisy-bias site of a quantized MiniLM-L3 (one activation
feeding linear layers), try every candidate the search can produce (the 16 (amplitude, shift)
pairs of the default grid, three shift-only noises, and the per-channel candidate of
``NoisyBiasOptions(draws=8)``), apply it alone with :func:`ogt.quant.noisy_bias.apply_noises`
and measure the mean embedding cosine against float on *both* the 64 calibration sentences and
the 256 evaluation sentences. Per site it prints the candidate a search on the calibration cosine
would pick and the *oracle*: the candidate best on the evaluation set itself (no method can do
better with this family at that site). Sites are walked in graph order, greedily keeping the
calibration pick when it raises the calibration cosine; the last line is where that greedy,
end-metric search ends on the evaluation set.

    python benchmarks/noisy_bias_oracle.py --bits 8 4 --method percentile

Data: ``benchmarks/work/quantize/minilm_l3/{calib_64,eval}.npz`` (written by
``quantize_compare.py`` / ``noisy_bias_compare.py``). About 10-15 minutes per setting on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ogt  # noqa: E402
from _quant_children import fidelity  # noqa: E402
from ogt.calib.data import npz_source  # noqa: E402
from ogt.quant._noise_sites import find_sites  # noqa: E402
from ogt.quant.noisy_bias import apply_noises, noise, noise_pattern, per_channel_noise  # noqa: E402
from ogt.quant.quantize import QuantizeOptions, quantize  # noqa: E402
from ogt.quant.tokens import token_mask  # noqa: E402
from ogt.testing.equivalence import Runner  # noqa: E402

AMPLITUDES = (0.25, 0.5, 0.75, 1.0)
SHIFTS = (-0.5, -0.25, 0.0, 0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", nargs=2, type=int, default=(8, 4), metavar=("W", "A"))
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks/work/quantize/minilm_l3")
    ap.add_argument("--model", type=Path, default=ROOT / ".cache/models/minilm_l3.onnx")
    ap.add_argument("--output", default="461")
    ap.add_argument("--sites", type=int, default=None, help="only the first N sites (a quick check)")
    args = ap.parse_args()
    if not (args.work / "eval.npz").exists():
        sys.exit(f"no {args.work / 'eval.npz'}: run benchmarks/noisy_bias_compare.py (or quantize_compare.py) first")
    if not args.model.exists():
        from models.recipes import minilm_l3

        args.model = Path(minilm_l3())
    ev, ca = dict(np.load(args.work / "eval.npz")), dict(np.load(args.work / "calib_64.npz"))
    ev = {k: v for k, v in ev.items() if k in ca}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def embed(model, data):
        s = ort.InferenceSession(model if isinstance(model, str) else model.proto.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
        n = len(next(iter(data.values())))
        return np.concatenate([s.run([args.output], {k: v[i:i + 64] for k, v in data.items()})[0]
                               for i in range(0, n, 64)])

    refs = {"eval": embed(str(args.model), ev), "calib": embed(str(args.model), ca)}

    def score(model) -> dict[str, float]:
        out = {}
        for part, data in (("eval", ev), ("calib", ca)):
            out[part] = fidelity("embedding", embed(model, data), refs[part], None)["cos_mean"]
        return out

    w, a = args.bits
    res = quantize(ogt.load(args.model), npz_source(args.work / "calib_64.npz"),
                   QuantizeOptions(method=args.method, weight_bits=w, act_bits=a, progress=False))
    model = res.model
    current = base = score(model)
    print(f"MiniLM-L3 W{w}A{a} {args.method}: without noise, cosine eval {base['eval']:.4f} calib {base['calib']:.4f}")
    print("| site | calibration pick | its eval change | oracle (best on eval) | its eval change |")
    print("|---|---|---:|---|---:|")
    batches = [{k: v[i:i + 16] for k, v in ca.items()} for i in range(0, len(ca["input_ids"]), 16)]
    rows = []
    for tensor in [s.tensor for s in find_sites(model, quantized=True)[0]][:args.sites]:
        site = {s.tensor: s for s in find_sites(model, quantized=True)[0]}[tensor]
        u = noise_pattern(0, tensor, site.channels)
        candidates = {f"a={amp} s={sh}": noise(site, u, amp, sh) for amp in AMPLITUDES for sh in SHIFTS}
        candidates.update({f"a=0 s={sh}": noise(site, u, 0.0, sh) for sh in (-0.5, -0.25, 0.25)})
        xs = [Runner(model, [tensor])(b)[tensor] for b in batches]
        pc = per_channel_noise(model, site, xs, 0, 8, AMPLITUDES, SHIFTS, masks=[token_mask(b) for b in batches])
        if pc is not None:
            candidates["per-channel"] = pc
        scored = []
        for key, n in candidates.items():
            m = model.copy()
            apply_noises(m, {tensor: n})
            scored.append((score(m), key, m))
        pick = max(scored, key=lambda r: r[0]["calib"])
        oracle = max(scored, key=lambda r: r[0]["eval"])
        row = {"site": tensor, "step": float(site.step), "pick": pick[1], "pick_eval": pick[0]["eval"] - current["eval"],
               "pick_calib": pick[0]["calib"] - current["calib"], "oracle": oracle[1],
               "oracle_eval": oracle[0]["eval"] - current["eval"]}
        rows.append(row)
        print(f"| `{tensor[-48:]}` | {row['pick']} | {row['pick_eval']:+.4f} | {row['oracle']} | {row['oracle_eval']:+.4f} |",
              flush=True)
        if pick[0]["calib"] > current["calib"]:
            model, current = pick[2], pick[0]
    print(f"\ngreedy end-metric search on the calibration cosine: eval {base['eval']:.4f} -> {current['eval']:.4f}, "
          f"calib {base['calib']:.4f} -> {current['calib']:.4f}")
    out = ROOT / f"benchmarks/work/noisy_bias/oracle_w{w}a{a}_{args.method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": base, "greedy": current, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
