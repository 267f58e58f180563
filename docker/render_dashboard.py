#!/usr/bin/env python3
"""Renders docker/grafana-dashboard.json from a real Prometheus into a PNG: every panel's queries, run
over the last MINUTES with the range API, drawn as line charts in the dashboard's grid order (Grafana
itself cannot run on these machines). Needs matplotlib.

    docker/render_dashboard.py --prometheus http://127.0.0.1:9091 --minutes 5 --out docs/dashboard.png
"""
import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def query_range(base, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{q}", timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def label(metric, expr):
    shown = {k: v for k, v in metric.items() if k not in ("__name__", "instance", "job")}
    if shown:
        return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
    return expr if len(expr) < 60 else expr[:57] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--step", type=float, default=2)
    ap.add_argument("--dashboard", default=str(HERE / "grafana-dashboard.json"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dash = json.loads(Path(args.dashboard).read_text())
    panels = dash["panels"]
    end = time.time()
    start = end - args.minutes * 60
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    series_drawn = 0
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            for s in query_range(args.prometheus, target["expr"], start, end, args.step):
                xs = [(float(t) - start) / 60 for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                ax.plot(xs, ys, label=label(s["metric"], target["expr"]))
                series_drawn += 1
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=7)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_ylabel(unit, fontsize=8)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dash['title']} — rendered from {args.prometheus}, last {args.minutes:g} min", fontsize=12)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"{args.out}: {len(panels)} panels, {series_drawn} series")


if __name__ == "__main__":
    main()
