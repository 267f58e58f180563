#!/usr/bin/env python3
"""Plots req/s ÷ nginx proxy_pass per scenario from bench.sh results (results.tsv), as an SVG bar chart.

    bench/plot.py OUT.svg results.tsv [more.tsv ...]      # one group of bars per scenario and conns
    bench/plot.py --targets proxy,peer --names "proxy=this build,peer=previous build" OUT.svg results.tsv

Each bar is the median over rounds of the per-round ratio target req/s ÷ nginx req/s (the harness's
x_nginx); one bar per (file, target), labelled "file-dir/target". The goal of each scenario (issue 13)
is drawn as a tick. No plotting library needed: the SVG is written by hand.
"""
import collections
import os
import statistics
import sys

GOALS = {"unique": 0.5, "repeat": 2.0, "nokey": 0.8, "burst": 1.0}
COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2"]


def ratios(path, targets):
    rows = collections.defaultdict(dict)  # (round, scen, conns) -> target -> rps
    with open(path) as f:
        head = f.readline().rstrip("\n").split("\t")
        for line in f:
            r = dict(zip(head, line.rstrip("\n").split("\t")))
            try:
                rows[(r["round"], r["scenario"], int(r["conns"]))][r["target"]] = float(r["rps"])
            except (KeyError, ValueError):
                continue
    out = collections.defaultdict(list)  # (scen, conns, target) -> [ratio per round]
    for (_, scen, conns), by in rows.items():
        base = by.get("nginx")
        if not base:
            continue
        for t, rps in by.items():
            if t in targets:
                out[(scen, conns, t)].append(rps / base)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv):
    targets, names = {"proxy"}, {}
    while argv[:1] in (["--targets"], ["--names"]):
        if argv[0] == "--targets":
            targets = set(argv[1].split(","))
        else:
            names = dict(kv.split("=", 1) for kv in argv[1].split(","))
        argv = argv[2:]
    out, files = argv[0], argv[1:]
    series = []  # (label, {(scen, conns): ratio})
    for path in files:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        r = ratios(path, targets)
        for t in sorted(targets):
            series.append((names.get(t, f"{name}/{t}"), {(s, c): v for (s, c, tt), v in r.items() if tt == t}))
    groups = sorted({k for _, d in series for k in d}, key=lambda k: (list(GOALS).index(k[0]) if k[0] in GOALS else 9, k[1]))
    if not groups:
        sys.exit("plot.py: no ratios found")
    bw, gap, left, top, h = 18, 24, 60, 40, 260
    width = left + len(groups) * (len(series) * bw + gap) + 20
    ymax = max([2.2] + [v for _, d in series for v in d.values()])
    y = lambda v: top + h - v / ymax * h
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + h + 90 + 16 * len(series)}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="20" font-size="14">req/s ÷ nginx proxy_pass (median of rounds); ticks: goals</text>']
    for v in [0.5, 1.0, 1.5, 2.0]:
        if v <= ymax:
            svg.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                       f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}×</text>')
    x = left + gap / 2
    for scen, conns in groups:
        for i, (_, d) in enumerate(series):
            v = d.get((scen, conns))
            if v is not None:
                svg.append(f'<rect x="{x + i * bw:.1f}" y="{y(v):.1f}" width="{bw - 2}" height="{top + h - y(v):.1f}" fill="{COLORS[i % len(COLORS)]}"/>'
                           f'<text x="{x + i * bw + bw / 2 - 1:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="9">{v:.2f}</text>')
        goal = GOALS.get(scen)
        if goal:
            svg.append(f'<line x1="{x - 3:.1f}" x2="{x + len(series) * bw + 1:.1f}" y1="{y(goal):.1f}" y2="{y(goal):.1f}" stroke="#000" stroke-dasharray="4 2"/>')
        svg.append(f'<text x="{x + len(series) * bw / 2:.1f}" y="{top + h + 16}" text-anchor="middle">{scen}</text>'
                   f'<text x="{x + len(series) * bw / 2:.1f}" y="{top + h + 30}" text-anchor="middle">c{conns}</text>')
        x += len(series) * bw + gap
    for i, (label, _) in enumerate(series):
        yy = top + h + 50 + 16 * i
        svg.append(f'<rect x="{left}" y="{yy - 10}" width="12" height="12" fill="{COLORS[i % len(COLORS)]}"/><text x="{left + 18}" y="{yy}">{label}</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
