"""Turns scripts/bench/serve's results (JSON lines) into its table, its chart and the results
section of docs/BENCHMARKS.md (between the `serve:begin` and `serve:end` markers).

usage: report.py RESULTS.jsonl OUT.md [--chart PNG] [--doc BENCHMARKS.md]
"""

import argparse
import datetime
import json
import os
import platform
import re

BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"


def ms(us):
    return "" if us is None else f"{us / 1000:.2f}"


def table(rows):
    # The embedded gateway's own health rate: what every Model Hub row is compared with.
    bare = {r["model"]: r["rps"] for r in rows if r["what"] == "health" and r["server"] == "modelhub"}
    fastapi = {(r["model"], r["c"]): r["rps"] for r in rows if r["server"] == "fastapi-2w"}
    lines = [
        "| model | server | request | c | req/s | p50 ms | p99 ms | errors | × bare health | × FastAPI-2w |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = bare.get(r["model"])
        f = fastapi.get((r["model"], r["c"]))
        what = "GET /v1/health" if r["what"] == "health" else "predict"
        ours = r["server"].startswith("modelhub")
        if ours and r["what"] == "predict":
            what = "predict, signed + charged"
        # The ratio to bare is the gateway's own: Model Hub rows only.
        xb = f"{r['rps'] / b:.3f}" if b and ours else ""
        xf = f"{r['rps'] / f:.2f}" if f and r["what"] != "health" else ""
        lines.append(
            f"| {r['model']} | {r['server']} | {what} | {r['c']} | {r['rps']:,.0f} | "
            f"{ms(r['p50_us'])} | {ms(r['p99_us'])} | {r['errors']} | {xb} | {xf} |"
        )
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["what"] == "predict"]
        for server in sorted({r["server"] for r in mine}):
            pts = sorted((r["c"], r["rps"]) for r in mine if r["server"] == server)
            label = {
                "modelhub": "Model Hub (signed + charged)",
                "modelhub-mongodb": "Model Hub, registry on MongoDB",
            }.get(server, server)
            ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("predictions / s")
        ax.set_title(f"{model}: throughput by concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("out")
    p.add_argument("--chart")
    p.add_argument("--doc")
    a = p.parse_args()
    rows = [json.loads(l) for l in open(a.results) if l.strip()]
    if not rows:
        raise SystemExit("no results")
    md = table(rows)
    print(md)
    with open(a.out, "w") as f:
        f.write(md + "\n")
    if a.chart:
        chart(rows, a.chart)
    if a.doc:
        day = datetime.date.today().isoformat()
        cpu = platform.processor() or platform.machine()
        section = (
            f"{BEGIN}\n_Last full run: {day}, `scripts/bench/serve`, {os.cpu_count()} cores ({cpu}); "
            f"raw numbers in `target/bench/serve.jsonl`._\n\n{md}\n\n"
            f"![throughput by concurrency](bench/serve.png)\n{END}"
        )
        doc = open(a.doc).read()
        if BEGIN in doc:
            doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, doc, flags=re.S)
        else:
            doc += "\n" + section + "\n"
        with open(a.doc, "w") as f:
            f.write(doc)


if __name__ == "__main__":
    main()
