"""Quality table: what each compression config costs on the real model, against its own fp16 cache.

One model load, every config of ``--configs`` through the harness (gear_dist.evals) with the
``--eval`` settings of conf/eval/; writes bench/results/quality-<device>-<date>.json and prints a
markdown table (the README shows it).

    python bench/quality.py                                  # SmolLM2-135M, eval=full
    python bench/quality.py --eval quick --configs fp16 gear
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gear_dist import results
from gear_dist.cache import use_gear_attention
from gear_dist.config import Config, register_configs
from gear_dist.evals.harness import evaluate
from gear_dist.models import load

CONFIGS = ["fp16", "kivi_8bit", "kivi", "gear_l", "gear", "kivi_4bit", "gear_4bit"]
COLUMNS = ["method", "bits", "bits_per_element", "rel_err_k", "rel_err_v", "ppl", "ppl_rel_delta", "kl",
           "top1_agreement", "greedy_agreement", "greedy_free_agreement", "gsm8k_nll_delta", "passkey_acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--eval", default="full")
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    register_configs()
    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    rows, model = [], None
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        for name in args.configs:
            cfg: Config = OmegaConf.to_object(compose("config", [f"model={args.model}", f"eval={args.eval}",
                                                                 f"compression={name}"]))
            if model is None:
                model, tokenizer = load(cfg.model)
                use_gear_attention(model)
            torch.manual_seed(cfg.eval.seed)
            metrics = evaluate(model, tokenizer, cfg.compression, cfg.eval)
            rows.append(dict(method=name, bits=cfg.compression.bits, model=cfg.model.name, **metrics))
            logging.info("%s: %s", name, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    result = results.record("quality", rows, model=cfg.model.name, eval=OmegaConf.to_container(OmegaConf.structured(cfg.eval)))
    path = results.write(result, args.out, suffix=args.eval)
    print(results.markdown(rows, [c for c in COLUMNS if c in rows[0]]))
    print(f"\nwrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
