#!/usr/bin/env python3
"""Static rendering of deploy/grafana/sds-server.json, for the README.

Not Grafana: every panel's PromQL is evaluated by a real Prometheus (its HTTP
API, query_range and query) over what it scraped from a real sds-server, and
drawn with matplotlib at the panel's place in the dashboard's grid. $job and
$instance match everything; $__rate_interval is 1m. See capture.sh.

usage: render.py --prometheus http://127.0.0.1:9090 --dashboard sds-server.json
                 --minutes 5 --out dashboard.png
"""
import argparse
import json
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARS = {"$job": ".*", "$instance": ".*", "$__rate_interval": "1m", "${datasource}": ""}
COLORS = {"green": "#37872d", "orange": "#fa6400", "red": "#c4162a"}


def promql(expr):
    for k, v in VARS.items():
        expr = expr.replace(k, v)
    return expr


def api(base, path, **params):
    url = base.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def human(v, unit):
    if unit == "s":
        a = abs(v)
        for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
            if a >= size:
                return f"{v / size:.1f} {name}"
        return f"{v:.0f} s"
    if v == int(v):
        return str(int(v))
    return f"{v:.3g}"


def color_for(v, panel):
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    c = "green"
    for s in steps:
        if s["value"] is None or v >= s["value"]:
            c = s["color"]
    return COLORS.get(c, c)


def draw_stat(ax, panel, base):
    t = panel["targets"][0]
    res = api(base, "/api/v1/query", query=promql(t["expr"]))
    ax.set_xticks([])
    ax.set_yticks([])
    if not res:
        ax.text(0.5, 0.45, "no data", ha="center", va="center", fontsize=14, color="#888")
        return
    unit = panel["fieldConfig"]["defaults"].get("unit", "none")
    if panel["options"].get("textMode") == "name":
        text = legend(t.get("legendFormat"), res[0]["metric"])
        ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=10)
        return
    v = float(res[0]["value"][1])
    text = human(v, unit)
    for m in panel["fieldConfig"]["defaults"].get("mappings", []):
        text = m.get("options", {}).get(text, {}).get("text", text)
    ax.set_facecolor(color_for(v, panel))
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=18, color="white", weight="bold")


def draw_series(ax, panel, base, start, end, step):
    n = 0
    for t in panel["targets"]:
        for s in api(base, "/api/v1/query_range", query=promql(t["expr"]), start=start, end=end, step=step):
            xs = [(float(ts) - end) / 60 for ts, _ in s["values"]]
            ys = [float(v) for _, v in s["values"]]
            ax.plot(xs, ys, linewidth=1.2, label=legend(t.get("legendFormat"), s["metric"]))
            n += 1
    ax.tick_params(labelsize=7)
    ax.set_xlabel("minutes", fontsize=7)
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prometheus", required=True)
    p.add_argument("--dashboard", required=True)
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--out", required=True)
    o = p.parse_args()
    dash = json.load(open(o.dashboard))
    panels = dash["panels"]
    rows = max(pn["gridPos"]["y"] + pn["gridPos"]["h"] for pn in panels)
    unit = 0.32  # inches per grid row
    fig = plt.figure(figsize=(24 * 0.75, rows * unit))
    end = time.time()
    start = end - o.minutes * 60
    for pn in panels:
        g = pn["gridPos"]
        rect = [g["x"] / 24 + 0.004, 1 - (g["y"] + g["h"]) / rows + 0.012, g["w"] / 24 - 0.008, g["h"] / rows - 0.03]
        if pn["type"] == "row":
            fig.text(0.005, 1 - (g["y"] + 0.7) / rows, pn["title"], fontsize=12, weight="bold")
            continue
        ax = fig.add_axes(rect)
        ax.set_title(pn["title"], fontsize=9, loc="left")
        if pn["type"] == "stat":
            draw_stat(ax, pn, o.prometheus)
        else:
            draw_series(ax, pn, o.prometheus, start, end, 5)
    fig.suptitle(f"{dash['title']}: static rendering of the dashboard's queries (real Prometheus, real data; not Grafana)",
                 fontsize=11, y=0.999)
    fig.savefig(o.out, dpi=80)


if __name__ == "__main__":
    main()
