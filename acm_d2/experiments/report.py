"""The report of a comparison grid: mean +- std over seeds per (backbone, variant), as a
Markdown table and a bar chart; the paper's Table 6 beside the measured numbers on COCO."""
import math
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .paper import TABLE6_TEST_SET, table6_row

__all__ = ["BASELINE", "DIFFERENCE_COLUMNS", "difference_to_baseline", "row_label", "summarize", "write_chart",
           "write_markdown"]

Row = Tuple[Optional[str], str]  # (backbone or None for the config's own, variant)

#: The variant every other one of the same backbone is set against in the differences table.
BASELINE = "plain"
#: The columns of the differences table, where the summary has them.
DIFFERENCE_COLUMNS = ("box AP", "box context", "box local", "mask AP", "mask context", "mask local",
                      "label context_label_acc")


def row_label(row: Row) -> str:
    backbone, variant = row
    return f"{backbone} {variant}" if backbone else variant


def _mean_std(values) -> Tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[dict], rows: Sequence[Row], classes, context_classes, local_classes,
              costs: Dict[Row, dict]) -> Tuple[Dict[Row, Dict[str, tuple]], List[str]]:
    """{row: {column: (mean, std, n)}} and the column names: "box AP", "box AP50", "box AP75",
    "box context", "box <class>", ..., the same for "mask", "label context_label_acc",
    "kq mean_abs_cosine", and "cost parameters (M)", "cost GFLOPs", "cost s / image"."""
    columns: List[Tuple[str, Callable]] = []
    for task, short in (("bbox", "box"), ("segm", "mask")):
        for name in ("AP", "AP50", "AP75"):
            columns.append((f"{short} {name}", lambda m, t=task, k=name: m.get(f"{t}/{k}", math.nan)))
        for group, members in (("context", context_classes), ("local", local_classes)):
            if members:
                columns.append(
                    (f"{short} {group}", lambda m, t=task, c=members: statistics.fmean(m.get(f"{t}/AP-{x}", math.nan) for x in c))
                )
        for cls in classes:
            columns.append((f"{short} {cls}", lambda m, t=task, c=cls: m.get(f"{t}/AP-{c}", math.nan)))
    if context_classes:
        columns.append(("label context_label_acc", lambda m: m.get("context/label_acc", math.nan)))
    if any("kq/mean_abs_cosine" in r["metrics"] for r in results):
        columns.append(("kq mean_abs_cosine", lambda m: m.get("kq/mean_abs_cosine", math.nan)))
    columns.append(("cost s / image", lambda m: m.get("time/inference_s_per_image", math.nan)))
    table = {}
    for row in rows:
        runs = [r for r in results if (r.get("backbone"), r["variant"]) == row and not r.get("failed")]
        table[row] = {name: (*_mean_std([fn(r["metrics"]) for r in runs]), len(runs)) for name, fn in columns}
        cost = costs.get(row, {})
        table[row]["cost parameters (M)"] = (cost.get("parameters_m", math.nan), 0.0, 1)
        table[row]["cost context parameters (M)"] = (cost.get("context_parameters_m", math.nan), 0.0, 1)
        table[row]["cost GFLOPs"] = (cost.get("gflops", math.nan), 0.0, 1)
    names = [name for name, _ in columns]
    names = [n for n in names if n != "cost s / image"] + ["cost parameters (M)", "cost context parameters (M)",
                                                          "cost GFLOPs", "cost s / image"]
    return table, names


def _cell(ms, digits: int = 2) -> str:
    mean, std, n = ms
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def difference_to_baseline(table, row: Row, column: str) -> Optional[Tuple[float, bool]]:
    """(mean of ``row`` minus the mean of the same backbone's BASELINE row, whether that exceeds
    twice the larger of the two seed stds), or None without a baseline or a value."""
    baseline = (row[0], BASELINE)
    if row == baseline or baseline not in table or column not in table[row]:
        return None
    (mean, std, n), (base_mean, base_std, base_n) = table[row][column], table[baseline][column]
    if math.isnan(mean) or math.isnan(base_mean):
        return None
    difference = mean - base_mean
    return difference, n > 1 and base_n > 1 and abs(difference) > 2 * max(std, base_std)


def _differences_section(table, columns, rows: Sequence[Row], head: str, rule: str, first) -> List[str]:
    """The differences table's lines; ``head``, ``rule`` and ``first`` write the row-label columns."""
    cols = [c for c in DIFFERENCE_COLUMNS if c in columns]
    compared = [row for row in rows if any(difference_to_baseline(table, row, c) is not None for c in cols)]
    if not compared:
        return []
    lines = [f"### Difference to {BASELINE} (same backbone)", "",
             f"Mean minus the {BASELINE} backbone's mean; **bold** where the difference exceeds twice the larger "
             f"of the two seed stds.", "", head + " " + " | ".join(c.replace("label ", "") for c in cols) + " |",
             rule + "---|" * len(cols)]
    for row in compared:
        cells = []
        for c in cols:
            found = difference_to_baseline(table, row, c)
            cells.append("n/a" if found is None else (f"**{found[0]:+.2f}**" if found[1] else f"{found[0]:+.2f}"))
        lines.append(first(row) + " " + " | ".join(cells) + " |")
    return lines + [""]


def write_markdown(path, table, columns, rows: Sequence[Row], command: str, n_seeds: int, context_classes,
                   local_classes, failures=(), running=(), paper_backbones: Optional[Dict] = None) -> None:
    """comparison.md: a table per metric family; the paper's Table 6 beside the measured numbers
    when ``paper_backbones`` (row backbone -> Table 6 backbone) is given (COCO val runs)."""
    several = any(b for b, _ in rows)
    head = "| backbone | variant |" if several else "| variant |"

    def first(row):
        return f"| {row[0]} | {row[1]} |" if several else f"| {row[1]} |"

    lines = [f"AP (COCO AP@[.5:.95], in %) as mean ± sample std over {n_seeds} seed(s).", "", f"Command: `{command}`", ""]
    if context_classes or local_classes:
        lines += [
            f"Context categories (label decided only by far-away context): {', '.join(context_classes)}; "
            f"local categories (control): {', '.join(local_classes)}. "
            f"\"context\"/\"local\" columns are the mean AP over those categories. "
            f"\"context_label_acc\": percent of ground-truth objects of the context categories whose "
            f"best-scoring detection among those categories (box IoU >= 0.5) has the right label "
            f"(a miss counts as wrong).",
            "",
        ]
    sections = [("box", "AP box"), ("mask", "AP mask")]
    if any(c.startswith("label ") for c in columns):
        sections.append(("label", "Label accuracy on the context categories (%)"))
    if any(c.startswith("kq ") for c in columns):
        sections.append(("kq", "Mean |cosine(K, Q)| on validation (x 100; paper: 11.13 with lambda 0, 3.94 with 0.1)"))
    sections.append(("cost", "Cost: parameters and FLOPs of the model (one test image), inference time per image "
                             "measured in the runs' evaluation"))
    for short, title in sections:
        cols = [c for c in columns if c.startswith(short + " ")]
        lines += [f"### {title}", "", head + " " + " | ".join(c[len(short) + 1:] for c in cols) + " |",
                  "|---|" + ("---|" if several else "") + "---|" * len(cols)]
        for row in rows:
            digits = 3 if short == "cost" else 2
            lines.append(first(row) + " " + " | ".join(_cell(table[row][c], digits) for c in cols) + " |")
        lines.append("")
    lines += _differences_section(table, columns, rows, head, "|---|" + ("---|" if several else ""), first)
    if paper_backbones is not None:
        lines += [f"### Beside the paper's Table 6 ({TABLE6_TEST_SET}; Kim et al., ECCV 2020)", "",
                  head + " AP box paper | AP box here | difference | AP mask paper | AP mask here | difference |",
                  "|---|" + ("---|" if several else "") + "---|" * 6]
        for row in rows:
            paper = table6_row(paper_backbones.get(row[0]), row[1])
            if paper is None:
                continue
            cells = []
            for task, short in (("bbox", "box"), ("segm", "mask")):
                mean = table[row][f"{short} AP"][0]
                cells += [f"{paper[f'{task}/AP']:.2f}", _cell(table[row][f"{short} AP"]),
                          "n/a" if math.isnan(mean) else f"{mean - paper[f'{task}/AP']:+.2f}"]
            lines.append(first(row) + " " + " | ".join(cells) + " |")
        lines.append("")
    if failures:
        lines.append("Failed runs (left out of the means; `--retry-failed` trains them again, except a job whose SLURM "
                     "state could not be read, which the next call checks again):")
        for r in failures:
            label = f"{r.get('backbone') + ' ' if r.get('backbone') else ''}{r['variant']} seed {r['seed']}"
            lines.append(f"- {label}: {r['failed'].splitlines()[0]}")
            if r.get("log_tail"):
                lines += ["", "  ```", *[f"  {line}" for line in r["log_tail"].splitlines()], "  ```"]
        lines.append("")
    if running:
        lines.append("Still running (collected by the next call): " + ", ".join(f"{r['run']} (job {r['job_id']})" for r in running))
        lines.append("")
    Path(path).write_text("\n".join(lines))


def write_chart(path, table, columns, rows: Sequence[Row]) -> None:
    """comparison.png: AP box and AP mask columns, one bar per row, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.4), squeeze=False)
    for ax, (short, title) in zip(axes[0], (("box", "AP box"), ("mask", "AP mask"))):
        cols = [c for c in columns if c.startswith(short + " ") and not c.endswith(("AP50", "AP75"))]
        x = np.arange(len(cols))
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            means = [table[row][c][0] for c in cols]
            stds = [table[row][c][1] for c in cols]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, np.nan_to_num(means), width, yerr=np.nan_to_num(stds),
                   capsize=2, label=row_label(row))
        ax.set_xticks(x)
        ax.set_xticklabels([c[len(short) + 1:] for c in cols], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{title}: mean ± std over seeds")
        top = np.nanmax([table[row][c][0] + table[row][c][1] for row in rows for c in cols] + [1.0])
        ax.set_ylim(0, top * 1.25)  # room above the bars for the legend
        ax.legend(fontsize=7, ncol=min(len(rows), 7), loc="upper center")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
