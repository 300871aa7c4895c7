"""A plot and a Markdown table of bench_rnn.py results: for each case (cell, dtype,
T, B, H) the forward+backward time of every method of the run, and MaskedRNN's
speedup over each baseline.

    python benchmarks/plot_rnn.py benchmarks/results/gpu_2026-11-27_h200/rnn_lstm.json \\
        --png benchmarks/results/gpu_2026-11-27_h200/rnn_lstm.png

The table goes to stdout (and to --md); the plot, one panel per file, needs
matplotlib.
"""
import argparse
import json
import os


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data["meta"], data["rows"]


def methods_of(meta, rows):
    names = [b for b in meta.get("baselines", []) if any(f"{b}_ms" in r for r in rows)]
    return names or sorted({k[:-3] for r in rows for k in r if k.endswith("_ms") and "_min" not in k})


def case_name(row):
    extra = " bi" if row.get("bidirectional") else ""
    extra += f" P={row['proj_size']}" if row.get("proj_size") else ""
    return f"{row['cell']} {row['dtype']} B={row['B']} H={row['H']}{extra}"


def table(path):
    meta, rows = load(path)
    names = methods_of(meta, rows)
    others = [n for n in names if n != "masked"]
    head = ["case", "T"] + [f"{n} ms" for n in names] + [f"x vs {n}" for n in others]
    if any("masked_fwd_us_per_step" in r for r in rows):
        head.append("fwd us/step")
    lines = [f"{os.path.basename(path)}: {meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
             f"commit {meta.get('commit', '?')}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [case_name(r), str(r["T"])]
        cells += [f"{r[n + '_ms']:.2f}" if f"{n}_ms" in r else "failed" for n in names]
        cells += [f"{r['speedup_vs_' + n]:.2f}" if f"speedup_vs_{n}" in r else "-" for n in others]
        if "fwd us/step" in head:
            cells.append(str(r.get("masked_fwd_us_per_step", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(paths, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(paths), 1, figsize=(11, 3.6 * len(paths)), squeeze=False)
    for ax, path in zip(axes[:, 0], paths):
        meta, rows = load(path)
        names = methods_of(meta, rows)
        width = 0.8 / len(names)
        for m, name in enumerate(names):
            xs = [i + (m - (len(names) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [r.get(f"{name}_ms", 0) for r in rows], width, label=name)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([case_name(r).replace(" B=", "\nB=") for r in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms (log)")
        ax.set_title(f"{os.path.basename(path)}: {meta.get('device', '?')}, torch "
                     f"{meta.get('torch', '?')}, T={rows[0]['T'] if rows else '?'}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(names))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="rnn_*.json files of bench_rnn.py")
    ap.add_argument("--png", default=None, help="write the plot here")
    ap.add_argument("--md", default=None, help="write the tables here too")
    args = ap.parse_args(argv)
    text = "\n\n".join(table(p) for p in args.results)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.png:
        plot(args.results, args.png)


if __name__ == "__main__":
    main()
