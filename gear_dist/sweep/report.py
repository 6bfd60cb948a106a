"""The local report of a sweep: results table (CSV, parquet, markdown) with every metric also
as a ratio to the fp16 baseline, a quality-vs-bits Pareto plot and throughput/memory plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, never a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gear_dist import results  # noqa: E402

QUALITY = ["ppl", "ppl_rel_delta", "kl", "top1_agreement", "greedy_agreement", "gsm8k_nll_delta", "passkey_acc",
           "rel_err_k", "rel_err_v"]
COLUMNS = ["label", "model", "bits", "bits_per_element", "compression_ratio", "rel_err_k", "rel_err_v", "ppl",
           "ppl_rel_delta", "kl", "top1_agreement", "greedy_agreement", "gsm8k_nll_delta", "passkey_acc",
           "kv_capacity_tokens"]


def with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """``<metric>_vs_fp16`` for every numeric metric: the trial over the fp16 trial of its model."""
    df = df.copy()
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               and not c.endswith("_vs_fp16")]
    base = df[df["method"] == "fp16"].set_index("model")
    for col in numeric:
        ref = df["model"].map(base[col]) if col in base else None
        if ref is not None:
            df[f"{col}_vs_fp16"] = df[col] / ref.where(ref != 0)
    return df


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points no other point beats on both fewer bits and lower ``y``."""
    pts = df.sort_values([x, y])
    best, keep = float("inf"), []
    for i, row in pts.iterrows():
        if row[y] < best:
            best = row[y]
            keep.append(i)
    return pts.loc[keep]


def plot_pareto(df: pd.DataFrame, path: Path, y: str = "kl") -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, part in df.groupby("model"):
        ax.scatter(part["bits_per_element"], part[y], label=model, s=30)
        for _, row in part.iterrows():
            ax.annotate(row["label"], (row["bits_per_element"], row[y]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto_front(part, "bits_per_element", y)
        ax.plot(front["bits_per_element"], front[y], "--", linewidth=1)
    ax.set_xlabel("bits per element (every byte held)")
    ax.set_ylabel(f"{y} vs the fp16 cache (lower is better)")
    ax.set_title("Quality against bytes: the Pareto front")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(df: pd.DataFrame, path: Path) -> None:
    batches = sorted(int(c.split("_b")[1]) for c in df.columns if c.startswith("tok_s_b") and "_vs_" not in c)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for _, row in df.iterrows():
        left.plot(batches, [row[f"tok_s_b{b}"] for b in batches], marker="o", label=row["label"])
    left.set_xlabel("batch (sequences decoded together)")
    left.set_ylabel("tokens / s")
    left.set_title("Throughput against batch")
    left.legend(fontsize=7)
    peak = [c for c in df.columns if c.startswith("peak_gib_b")]
    gpu = bool(peak) and df[peak].notna().any().any()
    if gpu:
        for _, row in df.iterrows():
            right.plot(batches, [row[f"peak_gib_b{b}"] for b in batches], marker="o", label=row["label"])
        right.set_xlabel("batch")
        right.set_ylabel("peak GPU memory (GiB)")
        right.set_title("Peak memory against batch")
    else:  # CPU: no device memory to watch; what the same KV budget holds instead
        right.bar(df["label"], df["kv_capacity_tokens"])
        right.set_ylabel("tokens the KV budget holds")
        right.set_title("Context held in the same memory")
        right.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    df = with_ratios(pd.DataFrame(rows)).sort_values(["model", "bits_per_element"])
    paths = {"csv": out_dir / "results.csv", "parquet": out_dir / "results.parquet", "markdown": out_dir / "results.md",
             "pareto": out_dir / "pareto.png", "throughput": out_dir / "throughput.png"}
    df.to_csv(paths["csv"], index=False)
    df.to_parquet(paths["parquet"], index=False)
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c.startswith("tok_s_b") and "_vs_" not in c]
    cols += [c for c in ("kl_vs_fp16", "ppl_vs_fp16") if c in df.columns]
    paths["markdown"].write_text(results.markdown(df.to_dict("records"), cols) + "\n")
    y = "kl" if "kl" in df.columns else "rel_err_v"
    plot_pareto(df, paths["pareto"], y)
    plot_throughput(df, paths["throughput"])
    return paths
