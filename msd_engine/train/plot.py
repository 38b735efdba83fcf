"""Training curves from `metrics.jsonl` (one JSON object per step): loss terms and top-1 accuracy."""
from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Write a PNG with the losses (total, feature, soft CE unweighted) and the draft's top-1 agreement per step
    (per draft step, for an unrolled run)."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or the 'test' extra)") from e
    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics to plot")
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    # an unrolled run's later draft steps (train --unroll-steps); a row without one plots a gap
    unrolled = sorted({k for r in rows for k in r if k.startswith("acc_")}, key=lambda k: int(k.split("_")[1]))
    step1 = " (step 1)" if unrolled else ""
    for key, label in (("loss", "loss"), ("feature_loss", "feature_loss" + step1), ("ce_loss", "ce_loss" + step1)):
        if key in rows[0]:
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in rows], label=label, linewidth=1)
    ax_loss.set(xlabel="step", ylabel="loss", title="draft loss", yscale="log")
    ax_loss.legend()
    ax_acc.plot(steps, [r["acc"] for r in rows], color="tab:green", linewidth=1, label="step 1")
    for key in unrolled:
        ax_acc.plot(steps, [r.get(key, float("nan")) for r in rows], linewidth=1, label=f"step {key.split('_')[1]}")
    if unrolled:
        ax_acc.legend()
    ax_acc.set(xlabel="step", ylabel="top-1 agreement", title="draft top-1 accuracy", ylim=(0, 1))
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
