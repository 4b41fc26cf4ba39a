"""Tables and plots from runs/: report.md, summary.json and PNG plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from kdpipe import KDPipeError
from kdpipe.cache.writer import atomic_write_bytes, atomic_write_json
from kdpipe.util import ensure_out_dir


def find_runs(paths) -> list[dict]:
    """metrics.json of each given run directory, or of each run directly inside a given directory."""
    found = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            files = [p / "metrics.json"]
        elif p.is_dir():
            files = sorted(p.glob("*/metrics.json"))
        else:
            raise KDPipeError(f"{p} is not a run directory (no metrics.json)")
        if not files:
            raise KDPipeError(f"{p} holds no runs (no metrics.json in it or its sub-directories)")
        for f in files:
            try:
                m = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise KDPipeError(f"cannot read {f}: {e}") from None
            m["_dir"] = str(f.parent)
            found.append(m)
    return found


def _fmt(x, spec=".4f", none="–"):
    return none if x is None else format(x, spec)


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _loss(r) -> str:
    """The run's loss as the report shows it: kd, or e.g. 'dkd (beta 8, warmup 20)' with the options that
    are not columns of their own. metrics.json of earlier versions has no "loss": kd."""
    loss = r.get("loss") or {"name": "kd", "options": {}}
    extra = [f"{k} {v:g}" for k, v in loss.get("options", {}).items() if k not in ("temperature", "alpha")]
    return loss["name"] + (f" ({', '.join(extra)})" if extra else "")


def _scratch(r) -> bool:
    """Trained without the teacher (kd with alpha 0, or any loss whose teacher terms weigh nothing)."""
    return not r["uses_teacher"] if "uses_teacher" in r else r["alpha"] == 0


def build_report(run_paths, out) -> dict:
    runs = find_runs(run_paths)
    out = ensure_out_dir(out, "report directory")
    teachers = {}
    for r in runs:
        t = r.get("teacher") or {}
        if t.get("fingerprint"):
            teachers[t["fingerprint"]] = t
    lines = ["# kdpipe report", ""]
    datasets = sorted({r.get("dataset", "?") for r in runs})
    sizes = sorted({r["train_samples"] for r in runs if r.get("train_samples")})  # older metrics: absent
    lines += [f"Dataset: {', '.join(datasets)}. {len(runs)} student run(s)"
              + (f", trained on {' or '.join(f'{k:,}' for k in sizes)} samples" if sizes else "") + ".", ""]
    lines += ["| model | role | loss | T | alpha | seed | test top-1 | agreement with teacher | parameters | MB | "
              "CPU latency (ms/image) | training time (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in teachers.values():
        lines.append(f"| {t.get('arch')} | teacher | | | | | {_fmt(t.get('test_top1'))} | 1.0000 | "
                     f"{t.get('parameters', 0):,} | {t.get('file_bytes', 0) / 1e6:.2f} | "
                     f"{_fmt(t.get('cpu_latency_ms'), '.3f')} | |")
    for r in sorted(runs, key=lambda r: (r["arch"], _loss(r), r["alpha"], r["temperature"], r["seed"])):
        role = "scratch" if _scratch(r) else "KD"
        lines.append(f"| {r['arch']} | {role} | {_loss(r)} | {'' if _scratch(r) else format(r['temperature'], 'g')} | "
                     f"{r['alpha']:g} | {r['seed']} | {_fmt(r.get('test_top1'))} | "
                     f"{_fmt(r.get('teacher_agreement'))} | {r['parameters']:,} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{_fmt(r.get('cpu_latency_ms'), '.3f')} | {r.get('train_wall_s', 0):.1f} |")
    groups = defaultdict(list)
    for r in runs:
        groups[(r["arch"], _loss(r), r["alpha"], None if _scratch(r) else r["temperature"])].append(r)
    summary = []
    for (arch, loss, alpha, temp), rs in sorted(groups.items(),
                                                key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0)):
        acc, acc_sd = _mean_std([r.get("test_top1") for r in rs])
        agr, agr_sd = _mean_std([r.get("teacher_agreement") for r in rs])
        summary.append({"arch": arch, "loss": loss, "scratch": _scratch(rs[0]), "alpha": alpha, "temperature": temp,
                        "seeds": sorted(r["seed"] for r in rs),
                        "test_top1_mean": acc, "test_top1_std": acc_sd, "agreement_mean": agr,
                        "agreement_std": agr_sd, "parameters": rs[0]["parameters"]})
    if any(len(s["seeds"]) > 1 for s in summary):
        lines += ["", "Over seeds (mean ± sample std):", "",
                  "| model | role | loss | T | alpha | seeds | test top-1 | agreement |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in summary:
            role = "scratch" if s["scratch"] else "KD"
            temp = "" if s["temperature"] is None else format(s["temperature"], "g")
            lines.append(f"| {s['arch']} | {role} | {s['loss']} | {temp} "
                         f"| {s['alpha']:g} | {len(s['seeds'])} | {_fmt(s['test_top1_mean'])} ± "
                         f"{_fmt(s['test_top1_std'])} | {_fmt(s['agreement_mean'])} ± {_fmt(s['agreement_std'])} |")
    versus = versus_scratch(groups)
    if versus:
        lines += ["", "KD against its scratch twin (same architecture and seeds; a clear gain is a mean gain of at "
                  "least twice the larger of the two sample standard deviations):", "",
                  "| model | loss | T | alpha | seeds | gain in test top-1 | 2 × larger std | wins | clear gain |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in versus:
            lines.append(f"| {v['arch']} | {v['loss']} | {v['temperature']:g} | {v['alpha']:g} | {len(v['seeds'])} | "
                         f"{v['gain']:+.4f} | {2 * v['larger_std']:.4f} | {v['wins']}/{len(v['seeds'])} | "
                         f"{'yes' if v['clear'] else 'no'} |")
    plots = _plots(runs, list(teachers.values()), out)
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    atomic_write_json(out / "summary.json", {"teachers": list(teachers.values()), "groups": summary,
                                             "versus_scratch": versus,
                                             "runs": [{k: v for k, v in r.items() if k != "teacher"} for r in runs]})
    return {"report": str(out / "report.md"), "plots": [str(p) for p in plots], "runs": len(runs)}


def versus_scratch(groups) -> list[dict]:
    """Each KD setting against the scratch runs of its architecture, over the seeds both have (at least 2):
    the mean gain in test top-1, the larger sample std of the two, the seeds where KD won, and whether the
    gain is clear (at least twice the larger std)."""
    out = []
    for (arch, loss, alpha, temp), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                kv[0][3] or 0)):
        if _scratch(rs[0]):
            continue
        twins = [g for k, g in groups.items() if k[0] == arch and _scratch(g[0])]
        if len(twins) != 1:
            continue
        kd = {r["seed"]: r.get("test_top1") for r in rs}
        scratch = {r["seed"]: r.get("test_top1") for r in twins[0]}
        seeds = sorted(s for s in kd.keys() & scratch.keys() if kd[s] is not None and scratch[s] is not None)
        if len(seeds) < 2:
            continue
        (kd_mean, kd_std), (sc_mean, sc_std) = (_mean_std([d[s] for s in seeds]) for d in (kd, scratch))
        larger = max(kd_std, sc_std)
        out.append({"arch": arch, "loss": loss, "alpha": alpha, "temperature": temp, "seeds": seeds,
                    "gain": kd_mean - sc_mean, "larger_std": larger, "wins": sum(kd[s] > scratch[s] for s in seeds),
                    "clear": kd_mean - sc_mean >= 2 * larger})
    return out


def _plots(runs, teachers, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for role, marker in (("scratch", "s"), ("KD", "o")):
        rs = [r for r in runs if _scratch(r) == (role == "scratch") and r.get("test_top1") is not None]
        if rs:
            ax.scatter([r["parameters"] for r in rs], [r["test_top1"] for r in rs], marker=marker, label=f"student ({role})")
    for t in teachers:
        if t.get("test_top1") is not None:
            ax.scatter([t["parameters"]], [t["test_top1"]], marker="*", s=200, c="k", label=f"teacher {t['arch']}")
    for r in runs:
        if r.get("test_top1") is not None:
            ax.annotate(r["name"], (r["parameters"], r["test_top1"]), fontsize=6, xytext=(4, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("test top-1")
    ax.set_title("accuracy against parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "accuracy_vs_parameters.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * (len(runs) + 1)), 4.5))
    names = [f"teacher {t['arch']}" for t in teachers] + [r["name"] for r in runs]
    accs = [t.get("test_top1") or 0 for t in teachers] + [r.get("test_top1") or 0 for r in runs]
    colors = ["k"] * len(teachers) + ["tab:gray" if _scratch(r) else "tab:blue" for r in runs]
    ax.bar(range(len(names)), accs, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    lo = min(a for a in accs if a) if any(accs) else 0
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(accs) + 0.02) if accs else 1)
    ax.set_ylabel("test top-1")
    ax.set_title("teacher vs students (grey: scratch, blue: KD)")
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
