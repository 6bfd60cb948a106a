"""Codec benchmark: KV fidelity and bits/element of every named config, and codec speed on CPU.

Relative Frobenius error of K and V for each config on (a) synthetic K/V with realistic
structure and (b) real K/V captured from SmolLM2-135M-Instruct (the model shipped in a PyPI
package, DESIGN §4) on shipped text; bits/element from the bytes really held, checked against
the closed-form formula; compress/decompress time per (head, block) matrix.

Configs are compared at equal *bytes*, not equal backbone bits (DESIGN §1.7): the table includes
3- and 4-bit KIVI, which sit at the bits/element of 2-bit GEAR.

    python bench/codec.py                       # full run, writes bench/results/codec-<device>-<date>.json
    python bench/codec.py --tokens 1024 --quick # fewer configs, shorter text
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from gear_dist import results
from gear_dist.codec import GearCodec, formula_bits_per_element
from gear_dist.config import CompressionConfig
from gear_dist.evals.kv_error import blocks, capture_kv, kv_fidelity
from gear_dist.evals.synthetic import synthetic_kv
from gear_dist.evals.text import load_text
from gear_dist.models import load_model

# (label, preset, overrides): every named config at its defaults, then equal-bytes comparators.
CONFIGS = [
    ("fp16", "fp16", {}),
    ("kivi", "kivi", {}),
    ("kcvt", "kcvt", {}),
    ("uniform", "uniform", {}),
    ("gear_l", "gear_l", {}),
    ("gear", "gear", {}),
    ("kivi", "kivi", dict(bits=3)),
    ("kivi", "kivi", dict(bits=4)),
    ("gear", "gear", dict(bits=3)),
    ("kcvt", "kcvt", dict(bits=4)),
    ("gear", "gear", dict(bits=4)),
    ("gear", "gear", dict(bits=4, backbone="kcvt")),  # the paper's 4-bit setting
]
QUICK = {0, 1, 4, 5, 7}


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def _row(label: str, cfg: CompressionConfig, data: str, fid: dict, n: int, d: int) -> dict:
    row = dict(method=label, bits=cfg.bits, backbone=cfg.backbone if cfg.compressed else "-", data=data,
               block_tokens=n, head_dim=d, rel_err_k=fid["rel_err_k"], rel_err_v=fid["rel_err_v"],
               bits_per_element=fid["bits_per_element"])
    if cfg.compressed:
        formula = [formula_bits_per_element(cfg, kind, n, d, cfg.rank_prefill) for kind in ("key", "value")]
        row["formula_bits_per_element"] = sum(formula) / 2
        row["compression_ratio"] = 16 / fid["bits_per_element"]
    else:
        row["formula_bits_per_element"], row["compression_ratio"] = 16.0, 1.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="packaged model for real K/V")
    ap.add_argument("--text", default="wikipedia", choices=["wikipedia", "pydoc"])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text to capture K/V on")
    ap.add_argument("--block", type=int, default=1024, help="tokens per compressed block")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    ap.add_argument("--quick", action="store_true", help="five configs only")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    configs = [c for i, c in enumerate(CONFIGS) if not args.quick or i in QUICK]

    model, tok = load_model("packaged", args.model)
    ids = tok(load_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    real = capture_kv(model, ids)
    gen = torch.Generator().manual_seed(0)
    d = 128
    synthetic = [(synthetic_kv(1, 8, tokens=args.block, head_dim=d, kind="key", generator=gen),
                  synthetic_kv(1, 8, tokens=args.block, head_dim=d, kind="value", generator=gen))]

    rows = []
    for label, preset, overrides in configs:
        cfg = CompressionConfig.preset(preset, **overrides)
        for data, kv in (("synthetic", synthetic), ("smollm2", real)):
            fid = kv_fidelity(kv, cfg, args.block)
            rows.append(_row(label, cfg, data, fid, args.block, kv[0][0].shape[-1]))
        if cfg.compressed:  # speed on one real layer's keys: [1, H, blocks, n, d]
            x = blocks(real[0][0], args.block)
            codec = GearCodec(cfg)
            block = codec.compress(x, "key", prefill=True)
            per = x.shape[1] * x.shape[2]
            rows[-1]["compress_ms"] = _time_ms(lambda: codec.compress(x, "key", prefill=True), args.repeats) / per
            rows[-1]["decompress_ms"] = _time_ms(lambda: block.decompress(), args.repeats) / per

    result = results.record("codec", rows, model=args.model, text=args.text, tokens=int(ids.shape[1]),
                            block_tokens=args.block)
    path = results.write(result, args.out, suffix="quick" if args.quick else "")
    cols = ["method", "bits", "backbone", "data", "rel_err_k", "rel_err_v", "bits_per_element",
            "formula_bits_per_element", "compression_ratio", "compress_ms", "decompress_ms"]
    for row in rows:
        row.setdefault("compress_ms", math.nan)
        row.setdefault("decompress_ms", math.nan)
    print(results.markdown(rows, cols))
    print(f"\nwrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
