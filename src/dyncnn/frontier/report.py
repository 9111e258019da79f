"""``frontier.md`` and ``frontier.png`` from the results of :func:`dyncnn.frontier.run_frontier`."""
from __future__ import annotations

from pathlib import Path

SPREAD_WARNING = 0.25     # IQR / median above which a latency is flagged as noisy
RUNTIME_NAMES = {"onnxruntime": ("ONNX Runtime", "ORT"), "executorch": ("ExecuTorch (XNNPACK)", "ET")}



def data_name(st: dict) -> str:
    """The data a run's settings name, in words (runs written before the dataset became a setting: ScaledMNIST)."""
    if st.get("dataset", "scaled_mnist") == "scaled_mnist":
        return f"ScaledMNIST {st['canvas']}x{st['canvas']}, clutter {st['clutter']}"
    return f"{st['dataset']} ({st.get('data_root')}) at {st['canvas']}x{st['canvas']}"

def _runtime(results: dict) -> tuple[str, str, str]:
    """(runtime id, its name, its short name in column titles) of a results dict."""
    rt = results["settings"].get("runtime", "onnxruntime")
    return (rt, *RUNTIME_NAMES[rt])


def _cond_name(cond: str) -> str:
    """``t2_b64`` -> ``batch 64, 2 threads``; ``tper-stage_b1`` -> ``batch 1, threads per stage``."""
    t, b = cond.rsplit("_", 1)
    if t[1:] == "per-stage":
        return f"batch {b[1:]}, threads per stage"
    return f"batch {b[1:]}, {t[1:]} thread{'s' if t[1:] != '1' else ''}"


def _ms(entry: dict) -> str:
    """``0.2030 ± 0.0100``; `` (!)`` where noisy; `` (= 2 threads)`` where the entry is another condition's
    timing (threads per stage on the same sessions: ``same_as``)."""
    med, iqr = entry["median_ms"], entry["p75_ms"] - entry["p25_ms"]
    flag = " (!)" if med > 0 and iqr / med > SPREAD_WARNING else ""
    same = f" (= {_cond_name(entry['same_as']).split(', ')[1]})" if entry.get("same_as") else ""
    return f"{med:.4f} ± {iqr / 2:.4f}{flag}{same}"


def ratio_words(speedup: float) -> str:
    """A speedup in words: ``1.90x faster``, and a ratio below 1 as ``1.89x slower`` (never ``0.53x faster``)."""
    if not 0 < speedup < float("inf"):
        return f"{speedup:.2f}x"
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _load_average(load) -> str:
    """``os.getloadavg()`` as recorded (a 1, 5 and 15 minute triple, or None) with 2 decimals."""
    return ", ".join(f"{v:.2f}" for v in load) if load else "unknown"


def selection_words(settings: dict) -> str:
    """How the run chose on validation (``selection_z``; results written before it: the point rule; and
    ``cascade_last``)."""
    z = settings.get("selection_z", 0.0)
    last = ("; the searched cascades end with the best static model"
            if settings.get("cascade_last", "any") == "reference" else "")
    if not z:
        return f"the cheapest whose validation accuracy reaches the best static model's{last}"
    return (f"the cheapest whose validation accuracy, less {z:g} standard error{'s' if z != 1 else ''} of its paired "
            f"difference from the best static model's, still reaches it{last}")


def headline(results: dict) -> str:
    """The one-sentence result: the best dynamic model's speedup at equal accuracy, batch 1."""
    summ = {c: v for c, v in results["summary"].items() if c != "selected"}
    conds = [c for c in summ if c.endswith("_b1")] or list(summ)
    cond = conds[0]
    label = results["summary"]["selected"]
    best = summ[cond][label]
    n = len(results["seeds"])
    within = "within 0.3 points of" if best["within_0.3_points"] else "short of"
    s = (f"**{label}** (the dynamic model chosen on validation: of the models whose chosen point reaches the "
         f"target, the lowest predicted latency) runs {ratio_words(best['speedup_mean'])} than the static front at "
         f"equal accuracy in {_runtime(results)[1]} ({_cond_name(cond)}; mean of {n} training "
         f"seed{'s' if n > 1 else ''}, speedup range "
         f"{best['speedup_min']:.2f}-{best['speedup_max']:.2f}x), its test accuracy "
         f"{best['accuracy_gap_mean'] * 100:+.2f} points from the best static model's "
         f"({best['best_static_mean']:.4f}: {within} it).")
    picks = {sd["seed"]: sd["dynamic"][label]["members"] for sd in results["seeds"]
             if sd["dynamic"][label].get("kind") in ("searched", "fused")}
    if picks:
        s += " Its members, chosen on validation: " + "; ".join(f"seed {k}: {' -> '.join(v)}"
                                                                for k, v in picks.items()) + "."
    others = [c for c in summ if c != cond and label in summ[c]]
    if others:
        s += " Elsewhere: " + ", ".join(f"{ratio_words(summ[c][label]['speedup_mean'])} at {_cond_name(c)}"
                                    for c in others) + "."
    return s


def distill_words(st: dict) -> str:
    """``; the other static networks also learn from X's logits (...)`` when the run distilled them, else
    nothing."""
    if not st.get("distill_from"):
        return ""
    return (f"; the other static networks also learn from {st['distill_from']}'s logits (knowledge distillation, "
            f"weight {st['distill_weight']}, temperature {st['distill_temperature']})")


def render_markdown(results: dict) -> str:
    st = results["settings"]
    m = results["machine"]
    seeds = results["seeds"]
    rt, rt_name, rt_short = _runtime(results)
    lines = ["# Accuracy against measured latency: dynamic networks vs the static front", "",
             headline(results), "",
             f"Data: {data_name(st)}; {st['epochs']} epochs for "
             f"every model (same schedule, augmentation and seed){distill_words(st)}; test split rendered "
             f"{st['test_repeats']} times "
             f"per digit. Operating points are chosen on the validation split ({selection_words(st)}), then "
             f"measured once on test. Latency: {rt_name}, ms "
             f"per image, median ± half the IQR over {st['rounds']} rounds in which every model is timed in turn; "
             f"(!) marks a spread above {SPREAD_WARNING:.0%} of the median; (= 1 thread), threads per stage that run "
             f"on the same sessions as that count, timed once. Machine: {m['processor']}, "
             f"{m['cpus']} CPUs, load average at the end {_load_average(m.get('load_average'))}, torch {m['torch']}, "
             f"{rt} {m.get(rt, '?')}.", "",
             "## Speedup at equal accuracy (mean over seeds)", "",
             "| dynamic model | condition | speedup | range | accuracy vs best static | kept of MAC speedup |",
             "|---|---|---|---|---|---|"]
    for cond, rows in results["summary"].items():
        if cond == "selected":
            continue
        for label, r in rows.items():
            lines.append(f"| {label} | {_cond_name(cond)} | {r['speedup_mean']:.2f}x | {r['speedup_min']:.2f}-"
                         f"{r['speedup_max']:.2f}x | {r['accuracy_gap_mean'] * 100:+.2f} points | "
                         f"{r['kept_mean']:.2f} |")
    for sd in seeds:
        conds = list(sd["merit"])
        lines += ["", f"## Seed {sd['seed']}", "", "### Static models", "",
                  "| model | MACs | params | val acc | test acc | " +
                  " | ".join(f"{rt_short} ms {_cond_name(c)}" for c in conds) + " | eager ms (b1) |",
                  "|---|---|---|---|---|" + "---|" * len(conds) + "---|"]
        front = {p["label"] for p in sd["merit"][conds[0]]["front"]}
        for label, r in sorted(sd["static"].items(), key=lambda kv: kv[1]["macs"]):
            eager_b1 = next((v for k, v in r["eager"].items() if k.endswith("_b1")), None)
            lines.append(f"| {label}{' (front)' if label in front else ''} | {r['macs'] / 1e6:.2f}M | "
                         f"{r['params'] / 1e3:.0f}k | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | " +
                         " | ".join(_ms(r["rt"][c]) for c in conds) +
                         f" | {_ms(eager_b1) if eager_b1 else '-'} |")
        lines += ["", "### Dynamic models (each row an operating point; chosen = picked on validation)", "",
                  "| model | point | val acc | test acc | mean MACs | exits taken (test) | predicted ms (b1) | " +
                  " | ".join(f"{rt_short} ms {_cond_name(c)}" for c in conds) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(conds)]
        for label, d in sd["dynamic"].items():
            for p in d["points"]:
                tag = "chosen" if p["chosen"] else "full depth" if p.get("full_depth") else \
                    f"q={p['q']:.3g}" if p.get("q") is not None else "grid"
                pred = ", ".join(f"{v:.4f}" for v in p["predicted_ms_b1"].values())
                lines.append(f"| {label} | {tag} | {p['val_accuracy']:.4f} | {p['test_accuracy']:.4f} | "
                             f"{p['test_mean_macs'] / 1e6:.2f}M | "
                             f"{'/'.join(f'{f:.2f}' for f in p['test_exit_fractions'])} | {pred} | " +
                             " | ".join(_ms(p["rt"][c]) for c in conds) + " |")
        if sd.get("cascade_search"):
            cs = sd["cascade_search"]
            lines += ["", "### Cascade search (validation split only)", "",
                      f"{cs['candidates']} cascades of 2-3 static models"
                      + (f" ending with {cs['last']}" if cs.get("last") else "")
                      + " scored on validation logits with the "
                      f"members' batch-1 {rt_short} latencies ({cs['threads']} thread(s), validation images): "
                      + ", ".join(f"{k} {v:.3f} ms" for k, v in cs["member_ms"].items()) + ". The cheapest "
                      "reaching the best static validation accuracy was built and timed:", "",
                      "| members | reaches target | val acc | predicted ms per image |", "|---|---|---|---|"]
            for r in cs["ranking"][:5]:
                lines.append(f"| {' -> '.join(r['members'])} | {'yes' if r['reaches'] else 'no'} | "
                             f"{r['val_accuracy']:.4f} | {r['val_cost']:.4f} |")
        if sd.get("fused_search"):
            lines += ["", "### Fused cascade search (validation split only)", "",
                      "The same chains scored as fused cascades (exit k: the summed log-probabilities of members "
                      "<= k), on the same member latencies; the cheapest reaching the target was fused, its "
                      "laterals trained, then calibrated and timed:", "",
                      "| members | reaches target | val acc | predicted ms per image |", "|---|---|---|---|"]
            for r in sd["fused_search"]["ranking"][:5]:
                lines.append(f"| {' -> '.join(r['members'])} | {'yes' if r['reaches'] else 'no'} | "
                             f"{r['val_accuracy']:.4f} | {r['val_cost']:.4f} |")
        lines += ["", "### Figure of merit per condition", "",
                  "| dynamic model | condition | chosen: test acc gap | static front ms at that accuracy | dynamic ms "
                  "| speedup | realized vs own full depth | MAC speedup | kept | predicted ms | measured ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for cond, block in sd["merit"].items():
            for label, r in block["models"].items():
                pred = f"{r['predicted_ms']:.4f}" if r["predicted_ms"] is not None else "-"
                lines.append(f"| {label} | {_cond_name(cond)} | {r['accuracy_gap'] * 100:+.2f} | "
                             f"{r['static_latency']:.4f} | {r['dynamic_latency']:.4f} | {r['speedup']:.2f}x | "
                             f"{r['realized_vs_full']:.2f}x | {r['mac_speedup']:.2f}x | {r['kept']:.2f} | {pred} | "
                             f"{r['measured_ms']:.4f} |")
        agree = [(p["offline_agrees"], p["n_test"]) for d in sd["dynamic"].values() for p in d["points"]]
        lines += ["", f"{rt_name} driver vs offline exit assignment from eager logits: "
                      f"{sum(a for a, _ in agree)}/{sum(n for _, n in agree)} test decisions equal."]
    noisy = [1 for sd in seeds for r in sd["static"].values() for v in r["rt"].values()
             if not v.get("same_as")            # another condition's timing, counted there
             and v["median_ms"] > 0 and (v["p75_ms"] - v["p25_ms"]) / v["median_ms"] > SPREAD_WARNING]
    if noisy:
        lines += ["", f"Warning: {len(noisy)} static latencies have a spread above {SPREAD_WARNING:.0%} of their "
                      f"median: the machine was busy; ratios within one round are still paired."]
    lines += ["", "![frontier](frontier.png)", "", f"Total time: {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_frontier(results: dict, path: Path) -> Path:
    """Two panels: test accuracy against the runtime's ms per image (batch 1, first thread count) and against
    MACs; the static Pareto front as a line, each dynamic model as a curve over its operating points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = results["seeds"]
    cond = next(iter(seeds[0]["merit"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for si, sd in enumerate(seeds):
        static = sd["static"]
        for ax, xkey in ((axes[0], "ms"), (axes[1], "macs")):
            xs = {k: (r["rt"][cond]["median_ms"] if xkey == "ms" else r["macs"] / 1e6) for k, r in static.items()}
            ax.scatter(list(xs.values()), [static[k]["test_accuracy"] for k in xs], color="black", marker="s",
                       s=28, label="static models" if si == 0 else None, zorder=3)
            if si == 0:
                for k in xs:
                    ax.annotate(k, (xs[k], static[k]["test_accuracy"]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")
            pts = sorted(((xs[k], static[k]["test_accuracy"]) for k in xs))
            front, best = [], -1.0
            for x, a in pts:
                if a > best:
                    front.append((x, a))
                    best = a
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black",
                    linestyle=styles[si % 4], lw=1.2, label=f"static front (seed {sd['seed']})")
            for di, (label, d) in enumerate(sd["dynamic"].items()):
                ps = sorted(d["points"], key=lambda p: p["val_cost"])
                x = [p["rt"][cond]["median_ms"] if xkey == "ms" else p["test_mean_macs"] / 1e6 for p in ps]
                y = [p["test_accuracy"] for p in ps]
                c = colors[di % len(colors)]
                ax.plot(x, y, marker="o", ms=4, color=c, linestyle=styles[si % 4],
                        label=f"{label} (seed {sd['seed']})" if si == 0 or len(seeds) == 1 else None)
                ch = next(p for p in ps if p["chosen"])
                ax.scatter([ch["rt"][cond]["median_ms"] if xkey == "ms" else ch["test_mean_macs"] / 1e6],
                           [ch["test_accuracy"]], marker="*", s=160, color=c, edgecolor="black", zorder=4)
    axes[0].set_xlabel(f"{_runtime(results)[1]} latency, ms per image ({_cond_name(cond)})")
    axes[1].set_xlabel("MACs per image (millions)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("accuracy against measured latency (star: point chosen on validation)")
    axes[1].set_title("accuracy against MACs")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{data_name(results['settings'])}: "
                 f"{len(seeds)} seed(s), {results['settings']['epochs']} epochs each")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path

