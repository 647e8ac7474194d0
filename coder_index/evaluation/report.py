"""Metrics and the report files: Markdown table, JSON details, t-SNE figure (paper Fig. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coder_index.core.atomic import atomic_write_json, atomic_write_text
from coder_index.methods.predict import top_k


def accuracy(logits: np.ndarray | None, preds: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    top1 = float((preds == labels).mean())
    if logits is None or logits.shape[1] < 5:  # top-5 of fewer than 5 classes means nothing (CLIP_benchmark: NaN)
        return top1, float("nan")
    idx, _ = top_k(logits, 5)
    return top1, float((idx == labels[:, None]).any(axis=1).mean())


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, float]:
    n = len(names)
    total = np.bincount(labels, minlength=n)
    right = np.bincount(labels[preds == labels], minlength=n)
    return {names[c]: round(float(right[c] / total[c]), 4) for c in np.flatnonzero(total)}


def most_confused(preds: np.ndarray, labels: np.ndarray, names: list[str], k: int = 10) -> list[dict[str, Any]]:
    wrong = preds != labels
    if not wrong.any():
        return []
    pairs, counts = np.unique(np.stack([labels[wrong], preds[wrong]], 1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:k]
    return [{"true": names[pairs[i, 0]], "predicted": names[pairs[i, 1]], "count": int(counts[i])} for i in order]


def rerank_effect(stage1: np.ndarray, stage2: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    changed = stage1 != stage2
    return {"changed": int(changed.sum()), "share_changed": round(float(changed.mean()), 4),
            "fixed": int((changed & (stage2 == labels)).sum()),
            "broke": int((changed & (stage1 == labels)).sum())}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# coder-index evaluation: {report['data']}", "",
             f"index `{report['index']}`, model {report['model']}, {report['images']} images "
             f"({report['skipped']} unreadable skipped), {len(report['classes'])} classes; "
             f"image encoding {report['encode_seconds']:.1f}s for {report.get('encoded', 0)} image(s)"
             + (f" ({report['encoded'] / report['encode_seconds']:.1f} images/s)"
                if report.get("encoded") and report["encode_seconds"] > 0 else "")
             + f", {report['embeddings_from_cache']} from the embedding cache. The images/s column times each method "
               "on the embeddings, encoding excluded.", "",
             "| method | top-1 | top-5 | images/s (the method alone) |", "| --- | ---: | ---: | ---: |"]
    for m in report["methods"]:
        top5 = "–" if m["top5"] != m["top5"] else f"{100 * m['top5']:.2f}"
        lines.append(f"| {m['name']} | {100 * m['top1']:.2f} | {top5} | {m['images_per_s']:.0f} |")
    for name, eff in report.get("rerank", {}).items():
        lines += ["", f"**{name}** changed {eff['changed']} prediction(s) ({100 * eff['share_changed']:.1f}%): "
                  f"fixed {eff['fixed']}, broke {eff['broke']}."]
    for name, conf in report.get("confused", {}).items():
        if conf:
            lines += ["", f"Most confused ({name}): " + "; ".join(
                f"{c['true']} → {c['predicted']} ({c['count']})" for c in conf[:5])]
    if report.get("notes"):
        lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report))


def write_clip_benchmark(report: dict[str, Any], out_dir: Path, fingerprint: Any) -> list[Path]:
    """CLIP_benchmark's result JSON (``metrics.acc1``, ``acc5``, ``mean_per_class_recall``) so that its
    aggregation scripts read coder-index results: ``clip_benchmark.json`` for the ``clip`` row, and
    ``clip_benchmark_<method>.json`` (with an extra ``method`` key) for every other row."""
    written = []
    for m in report["methods"]:
        dump = {"dataset": report["data"], "model": fingerprint.model, "pretrained": fingerprint.pretrained,
                "task": "zeroshot_classification",
                "metrics": {"acc1": m["top1"], "acc5": m["top5"], "mean_per_class_recall": m["mean_per_class_recall"]},
                "language": "en"}
        name = "clip_benchmark.json"
        if m["name"] != "clip":
            dump["method"] = m["name"]
            name = "clip_benchmark_" + "".join(ch if ch.isalnum() or ch in "-+_" else "_" for ch in m["name"]) + ".json"
        atomic_write_json(out_dir / name, dump)
        written.append(out_dir / name)
    return written


REPORT_EXTRA = "pip install 'coder-index[report]'"


def tsne_unavailable() -> str | None:
    """None when the t-SNE picture can be drawn; else one line saying what is missing and the fix."""
    import importlib.util

    missing = [dist for mod, dist in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(mod) is None]
    if not missing:
        return None
    return (f"t-SNE picture skipped: it needs {' and '.join(missing)} (the report extra): {REPORT_EXTRA}, or "
            "--tsne-samples 0 to say no picture is wanted")


def tsne_figure(raw: np.ndarray, coder: np.ndarray, labels: np.ndarray, names: list[str], path: Path,
                seed: int = 0) -> None:
    """Paper Fig. 5: t-SNE of raw image embeddings beside one of CODERs, coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(raw) - 1) / 3)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for ax, feats, title in ((axes[0], raw, "image embeddings"), (axes[1], coder, "CODER")):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
        ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(int(c) % cmap.N) for c in labels], s=6)
        ax.set_title(f"t-SNE of {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    present = np.unique(labels)
    if len(present) <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(int(c) % cmap.N), label=names[c]) for c in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(10, len(present)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
