"""Report of an evaluation: a cost-accuracy plot (PNG) and an HTML page.

Both are drawn from the result dict of `router.evaluate.evaluate` only (test
numbers), so the report never shows a number the JSON output does not have.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from router.core.errors import UserError

from . import metrics


def stem(data_name: str) -> str:
    for suf in (".gz", ".jsonl", ".json"):
        data_name = data_name.removesuffix(suf)
    return data_name


class ReportUnavailable(UserError):
    """--report needs the `report` extra."""


def plot(res: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib  # deferred: the `report` extra, loaded only by --report
    except ModuleNotFoundError:
        raise ReportUnavailable("--report draws with matplotlib: install the extra, "
                                "`pip install 'cascade-router[report]'`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib above

    usd = res["cost_unit"] == "usd"
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ci = 0
    for e in res["policies"]:
        if not e["applicable"] or not e["frontier"]:
            continue
        col = colours[ci % len(colours)]
        ci += 1
        pts = sorted((p["cost"], p["accuracy"]) for p in e["frontier"])
        v = metrics.hull(pts)
        style = "--" if e["baseline"] else "-"
        label = f"{e['name']}" + (f" (AIQ {e['aiq']:.3f})" if e.get("aiq") is not None else "")
        # wider lines first, so curves that coincide stay visible
        ax.plot([p[0] for p in v], [p[1] for p in v], style, color=col, label=label,
                lw=max(1.2, 4.0 - 0.7 * (ci - 1)), alpha=0.85)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=col, s=10, alpha=0.6)
        par = e.get("parity") or {}
        if par.get("reachable"):
            ax.scatter([par["cost"]], [par["accuracy"]], color=col, marker="D", s=60, edgecolor="black", zorder=5)
    for s in res["singles"]:
        ax.scatter([s["cost"]], [s["accuracy"]], color="black", marker="o", s=28, zorder=6)
        ax.annotate(s["name"], (s["cost"], s["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    o = res["oracle"]
    ax.scatter([o["cost"]], [o["accuracy"]], color="gold", edgecolor="black", marker="*", s=180, zorder=7,
               label="oracle (cheapest correct)")
    if usd and all(s["cost"] > 0 for s in res["singles"]):
        ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD, test)" if usd else "share of queries calling the strongest model (test)")
    ax.set_ylabel("accuracy (test)")
    sp = res["split"]
    how = (f"train {sp['train']} / test {sp['test']} rows" if sp["mode"] == "train/test"
           else f"{sp['mode']}, {sp['rows']} rows")
    ax.set_title(f"{res['data']}: test frontiers fitted on train ({how}); diamonds = parity points", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_online(res: dict[str, Any], path: Path) -> Path:
    """Prequential replay (`router.lab.online`): cumulative accuracy of the policy and of the
    reference along the stream (top), and the policy's cumulative cost over the reference's
    (bottom); dotted lines where the policy was re-tuned to another family."""
    try:
        import matplotlib  # deferred: the `report` extra, loaded only by --report
    except ModuleNotFoundError:
        raise ReportUnavailable("--report draws with matplotlib: install the extra, "
                                "`pip install 'cascade-router[report]'`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib above

    pts = res["points"]
    x = [p["rows"] for p in pts]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(x, [p["accuracy"] for p in pts], "-o", ms=3, label=f"{res['policy']} (re-tuned every "
             f"{res['retune_every']} rows)")
    ax1.plot(x, [p["reference_accuracy"] for p in pts], "--", color="black",
             label="reference: best single model on the rows labelled so far")
    ax1.plot(x, [p["hindsight_accuracy"] for p in pts], ":", color="grey",
             label=f"{res['hindsight']['name']} (best over the whole file, hindsight)")
    ax1.set_ylabel("cumulative accuracy")
    ax1.legend(fontsize=8, loc="best")
    ax1.grid(True, alpha=0.3)
    ax2.plot(x, [p["cost_ratio"] for p in pts], "-o", ms=3, color="tab:red")
    ax2.axhline(1.0, color="black", lw=0.8, ls="--")
    ax2.set_ylabel("cumulative cost / reference's")
    ax2.set_xlabel("queries answered")
    ax2.grid(True, alpha=0.3)
    prev = None
    for p, b in zip(pts, res["blocks"]):
        if prev is not None and b["label"] != prev:
            for ax in (ax1, ax2):
                ax.axvline(b["rows"][0] - 1, color="grey", lw=0.6, ls=":")
            ax1.annotate(b["label"], (b["rows"][0] - 1, ax1.get_ylim()[0]), rotation=90, fontsize=6,
                         va="bottom", ha="right", color="dimgrey")
        prev = b["label"]
    ax1.set_title(f"{res['data']}: prequential replay (seed {res['seed']}, {res['start_labels']} labels at start)",
                  fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_online(res: dict[str, Any], directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return plot_online(res, d / f"{stem(res['data'])}-online.png")


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def page(res: dict[str, Any], image: str, text: str) -> str:
    usd = res["cost_unit"] == "usd"
    cs = ".3e" if usd else ".4f"
    singles = [[html.escape(s["name"]), _fmt(s["accuracy"]), _fmt(s["cost"], cs), _fmt(s["latency_ms"], ".0f")]
               for s in res["singles"]]
    singles.append(["<b>oracle</b> (cheapest correct)", _fmt(res["oracle"]["accuracy"]), _fmt(res["oracle"]["cost"], cs), ""])
    b = res["best_single"]
    singles.append([f"<b>best single</b>: {html.escape(b['name'])}", _fmt(b["accuracy"]), _fmt(b["cost"], cs), ""])
    rl = "routellm" in res
    prow = []
    for e in res["policies"]:
        name = html.escape(e["name"]) + (" <i>(baseline)</i>" if e["baseline"] else "")
        if not e["applicable"]:
            prow.append([name, f"not applicable: {html.escape(e['reason'])}"] + [""] * (7 + 3 * rl))
            continue
        p = e["parity"]
        extra = [_fmt(e.get("apgr")), _fmt(e.get("cpt50"), ".3f"), _fmt(e.get("cpt80"), ".3f")] if rl else []
        if not p["reachable"]:
            prow.append([name, "parity not reachable: " + html.escape(p["reason"]), "", "", "", "", "",
                         _fmt(e["aiq"]), ""] + extra)
            continue
        r = p.get("random_at_matched_cost") or {}
        knobs = p.get("params") or p.get("params_per_fold")
        prow.append([name, _fmt(p["accuracy"]), _fmt(p["accuracy_delta"], "+.4f"), _fmt(p["cost"], cs),
                     _fmt(p["cost_ratio"], ".3f"), _fmt(r.get("accuracy")), _fmt(r.get("cost"), cs), _fmt(e["aiq"]),
                     f"<code>{html.escape(json.dumps(knobs))}</code>"] + extra)
    phead = ["policy", "accuracy", "Δ acc vs best single", "cost/query", "cost ratio", "random@cost acc",
             "random@cost cost", "AIQ", "parity knobs"] + (["APGR", "CPT(50%)", "CPT(80%)"] if rl else [])
    fronts = []
    for e in res["policies"]:
        if not e["applicable"] or not e["frontier"]:
            continue
        rows = [[_fmt(p["target_cost"], cs), _fmt(p["cost"], cs), _fmt(p["accuracy"]),
                 f"<code>{html.escape(json.dumps(p.get('params', 'per fold: see fold_knobs')))}</code>"]
                for p in e["frontier"]]
        fronts.append(f"<details><summary>{html.escape(e['name'])}: {len(rows)} frontier points</summary>"
                      + _table(["train budget", "test cost", "test accuracy", "knobs"], rows)
                      + "</details>")
    sp = res["split"]
    split = (f"knobs fitted on train ({sp['train']} rows), scored on test ({sp['test']} rows)"
             if sp["mode"] == "train/test" else f"{sp['mode']} over {sp['rows']} rows: {sp['note']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cascade evaluate: {html.escape(res['data'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;}}table{{border-collapse:collapse;margin:1em 0;}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px;}}td:first-child{{text-align:left;}}
code{{font-size:11px;}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px;}}</style></head>
<body>
<h1>{html.escape(res['data'])}</h1>
<p>{html.escape(split)}. Cost: {'USD per query' if usd else 'share of queries calling the strongest model'}.
Confidence signal: {html.escape(str(res['signal']))}. Rows scored: {res['rows']['scored']} of {res['rows']['file']}.</p>
<img src="{html.escape(image)}" alt="cost-accuracy plot" style="max-width:100%">
<h2>Single models and oracle (test)</h2>
{_table(["model", "accuracy", "cost/query", "latency ms"], singles)}
<h2>Policies: parity point and frontier</h2>
<p>Parity: knobs fitted on train to reach the best single model's train accuracy; Δ and cost ratio against the best
single model on test. random@cost: random routing fitted to the same train cost. AIQ: mean test accuracy of the
frontier over the cost range from the cheapest to the most expensive single model.</p>
{_table(phead, prow)}
{''.join(fronts)}
<h2>Console output</h2>
<pre>{html.escape(text)}</pre>
</body></html>
"""


def write(res: dict[str, Any], directory: str | Path, text: str) -> tuple[Path, Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    s = stem(res["data"])
    png = plot(res, d / f"{s}.png")
    page_path = d / f"{s}.html"
    page_path.write_text(page(res, png.name, text))
    return png, page_path
