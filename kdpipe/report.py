"""Tables and plots from runs/: report.md, summary.json and PNG plots."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from kdpipe import KDPipeError
from kdpipe.cache.writer import atomic_write_bytes, atomic_write_json, atomic_write_stream
from kdpipe.sweep import arch_label
from kdpipe.util import ensure_out_dir


# What the report reads of every run's metrics.json (kdpipe.student writes them all).
RUN_KEYS = ("name", "arch", "seed", "alpha", "temperature", "history")


def find_runs(paths) -> list[dict]:
    """metrics.json of each given run directory, or of each run directly inside a given directory."""
    return scan_runs(paths)[0]


def scan_runs(paths) -> tuple[list[dict], list[str]]:
    """find_runs, and the directories of unfinished runs: config.json, written when a run's pass starts,
    without metrics.json, written when it ends (kdpipe.resume)."""
    found, unfinished, seen = [], [], set()
    for p in map(Path, paths):
        started = []
        if (p / "metrics.json").is_file():
            files = [p / "metrics.json"]
        elif (p / "config.json").is_file():
            files, started = [], [str(p)]
        elif p.is_dir():
            files = sorted(p.glob("*/metrics.json"))
            started = [str(c.parent) for c in sorted(p.glob("*/config.json")) if not (c.parent / "metrics.json").is_file()]
        else:
            raise KDPipeError(f"{p} is not a run directory (no metrics.json)")
        unfinished += started
        if not files and not started:
            deeper = sorted({str(c.parent.parent) for c in p.glob("*/*/metrics.json")})
            if deeper:  # an ensemble pipeline's students/<teachers>/<run>/, or a folder of runs folders
                raise KDPipeError(f"{p} holds no runs itself, but folders of runs: give those ({' '.join(deeper)})")
            raise KDPipeError(f"{p} holds no runs (no metrics.json in it or its sub-directories)")
        for f in files:
            if f.resolve() in seen:  # given twice (a run and its parent): one run, counted once
                continue
            seen.add(f.resolve())
            try:
                m = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise KDPipeError(f"cannot read {f}: {e}") from None
            missing = [k for k in RUN_KEYS if not isinstance(m, dict) or k not in m]
            if missing:  # another tool's metrics.json in the folder, or one edited by hand
                raise KDPipeError(f"{f} is not the metrics.json of a kdpipe run (it has no {', '.join(missing)}): give "
                                  "the run directories train-student wrote, or move this file out of them")
            m["_dir"] = str(f.parent)
            found.append(m)
    if not found:
        shown = ", ".join(unfinished[:3]) + (f", ... ({len(unfinished)} in all)" if len(unfinished) > 3 else "")
        raise KDPipeError(f"no finished runs yet (unfinished: {shown}): run their train-student command again to "
                          "finish them")
    return found, unfinished


def _fmt(x, spec=".4f", none="–"):
    return none if x is None else format(x, spec)


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)  # one value: no std, not 0


def _pm(mean, std) -> str:
    """'0.8000 ± 0.0100'; one value has no sample std, and says so (not ± 0)."""
    if mean is None:
        return _fmt(mean)
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} (one value: no std)"


# Losses whose terms, with no teacher (alpha 0; dkd's beta 0 too), are cross-entropy alone
CE_WHEN_SCRATCH = ("kd", "dkd")


def _loss(r) -> str:
    """The run's loss as the report shows it: kd, or e.g. 'dkd (beta 8, warmup 20)' with the options that
    are not columns of their own. metrics.json of earlier versions has no "loss": kd. A scratch run (its
    teacher terms weigh nothing: kd with alpha 0) trained on cross-entropy alone: "ce", not the "kd" it was
    configured as, which read as distilled. Only kd's and dkd's: a loss of the user's that needs no teacher
    (label smoothing, say) keeps its own name, since cross-entropy is not what it trained on."""
    loss = r.get("loss") or {"name": "kd", "options": {}}
    if _scratch(r) and loss["name"] in CE_WHEN_SCRATCH:
        return "ce"
    extra = [f"{k} {v:g}" for k, v in loss.get("options", {}).items() if k not in ("temperature", "alpha")]
    return loss["name"] + (f" ({', '.join(extra)})" if extra else "")


def _scratch(r) -> bool:
    """Trained without the teacher (kd with alpha 0, or any loss whose teacher terms weigh nothing)."""
    return not r["uses_teacher"] if "uses_teacher" in r else r["alpha"] == 0


def _setting(r) -> str:
    """What a run's seed does not decide: its name without the seed (names hold everything else that
    differs, kdpipe.sweep.run_name), and the cache(s) it trained from where the report holds runs of several
    (_mark_sources). A plain-SGD run named before 2026-12-07, without its epochs, gets them where today's name
    has them (before an ensemble's tag), so that it and a run of today are seeds of one setting."""
    name = re.sub(r"-s\d+$", "", r["name"])
    if not re.search(r"-e\d+(-|$)", name):
        head, ens = re.fullmatch(r"(.*?)((?:-ens[0-9._]+)?)", name).groups()
        name = f"{head}-e{r.get('epochs', '?')}{ens}"
    return name + (f" [{r['_source']}]" if r.get("_source") else "") + _variant(r)


def _on(dataset: str, several: bool) -> str:
    """A plot label's dataset, where the report holds several (--mix-datasets): a setting may be on each."""
    return f" [{dataset}]" if several else ""


def _variant(r) -> str:
    return f" {{{r['_variant']}}}" if r.get("_variant") else ""


# config.json keys that are not settings a run's name may leave out: where and with what it ran, its seed, its
# cache(s) (_mark_sources labels those) and autocast (the device's).
_NOT_VARIANT = ("run", "device", "cache", "cache_id", "ensemble", "ensemble_paths", "kdpipe_version",
                "torch_version", "seed", "amp")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def _config_settings(r) -> dict:
    """The run's config.json, flattened, less _NOT_VARIANT; {} for a run without one (metrics of earlier
    versions, or given without its folder)."""
    f = Path(r["_dir"]) / "config.json" if r.get("_dir") else None
    try:
        cfg = json.loads(f.read_text()) if f is not None and f.is_file() else None
    except (OSError, ValueError):
        cfg = None
    return _flat({k: v for k, v in cfg.items() if k not in _NOT_VARIANT}) if isinstance(cfg, dict) else {}


def _mark_variants(runs) -> None:
    """Runs of one name (and cache) whose config.json holds other settings that the name leaves out (the
    architecture's --arch-args, the batch size with otherwise default training, a hint layer) are not seeds of
    one setting: each gets "_variant", the settings that differ ("arch_args.width=4"). Two runs of one setting
    and one seed are the same run twice, and are refused."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r.get("dataset", "?"), _setting(r))].append(r)
    for rs in groups.values():
        sig = {id(r): _config_settings(r) for r in rs}
        keys = sorted({k for x in sig.values() for k in x})
        differ = [k for k in keys if len({sig[id(r)].get(k) for r in rs if sig[id(r)]}) > 1]
        for r in rs:
            if differ and sig[id(r)]:
                r["_variant"] = ", ".join(f"{k}={json.loads(sig[id(r)][k]) if k in sig[id(r)] else '-'}"
                                          for k in differ)
        seen = {}
        for r in rs:
            key = (r.get("_variant", ""), r["seed"])
            if key in seen:
                raise KDPipeError(f"{seen[key]['_dir']} and {r['_dir']} are one setting with one seed ({r['seed']}), "
                                  "the same run twice: report one of them")
            seen[key] = r


def _cache_ids(r) -> tuple:
    """The cache(s) a run trained from, by id (an ensemble's in its order); (None,) for metrics without."""
    e = r.get("ensemble")
    if e:
        return tuple(t.get("cache_id") for t in e["teachers"])
    return ((r.get("cache") or {}).get("cache_id"),)


def _mark_sources(runs) -> None:
    """Runs of one name from different caches (other teachers, other views, the same student in two pipelines'
    blocks) are not seeds of one setting. Where the runs come from more than one cache (or set of caches), each
    gets "_source", a label of its cache(s): the caches' folder names (joined by '+'), or their ids where two
    caches share a folder name."""
    if len({_cache_ids(r) for r in runs}) < 2:
        return
    folder = {}  # cache id -> the name of its folder
    for r in runs:
        e = r.get("ensemble")
        paths = [t.get("cache") for t in e["teachers"]] if e else [(r.get("cache") or {}).get("path")]
        folder.update((i, Path(path).name if path else None) for i, path in zip(_cache_ids(r), paths))
    shared = Counter(folder.values())

    def label(i) -> str:
        return folder[i] if folder[i] and shared[folder[i]] == 1 else f"cache {str(i)[:8]}"

    for r in runs:
        r["_source"] = "+".join(label(i) for i in _cache_ids(r))


def _train_s(r) -> float:
    """The run's own training time; metrics of earlier versions have only the whole pass's."""
    return r.get("train_s", r.get("train_wall_s", 0.0))


def _best(best) -> str:
    """'3 (0.8125; 0.7950)': the epoch the validation split picked, its validation top-1 and its test top-1 (the
    final number of a workflow whose validation split picks the epoch: Food-11's evaluation/), which the test
    top-1 column, the last epoch's, is not."""
    if not best:
        return ""
    test = best.get("test_top1")
    return f"{best['epoch']} ({best['val_top1']:.4f}" + (f"; {test:.4f})" if test is not None else ")")


def _errors(top1, n) -> str:
    """' (89)': the test errors a test top-1 of n samples makes (top-1 is correct / n, so this is exact)."""
    return f" ({round((1 - top1) * n):,})" if top1 is not None and n else ""


def _diverged(r) -> str:
    """A mark for a run whose loss became NaN or infinite (its figures are not a trained student's)."""
    return f" (diverged in epoch {r['diverged_epoch']})" if r.get("diverged_epoch") else ""


def _diverged_runs(n: int) -> str:
    """A mark for a mean over runs of which n diverged (their figures are in it: a setting that diverges is
    what it is, but the reader must know)."""
    return f" ({n} diverged)" if n else ""


def _role(r) -> str:
    src = r.get("_source")  # the report holds runs of several caches: say which
    if _scratch(r):
        return "scratch" + (f", views of {src}" if src else "")
    ens = r.get("ensemble")
    if ens:
        return f"KD from ensemble {ens['tag']}: {ens['label']}" + (f" [{src}]" if src else "")
    return "KD" + (f" from {src} ({(r.get('teacher') or {}).get('arch', '?')})" if src else "")


def _ensembles(runs) -> list[str]:
    """The report's lines on the ensembles of teachers that runs trained from (kdpipe.ensemble): per ensemble and
    T, its teachers with their weights, the mixture's test top-1 and the runs' mean agreement with each."""
    groups = defaultdict(list)
    for r in runs:
        e = r.get("ensemble")
        if e and not _scratch(r):  # a scratch twin saw the caches' views but learned nothing of the teachers
            # by its caches too: two pipelines' teachers "a" and "b" of one architecture share a label
            groups[(e["label"], e["temperature"], tuple(map(str, _cache_ids(r))))].append(r)
    if not groups:
        return []
    lines = ["", "Ensembles of teachers (students trained against the weighted mean of the teachers' probabilities "
             "at T; agreement: the students' mean top-1 agreement on the clean test split):", "",
             "| ensemble | T | teacher | weight | teacher test top-1 | agreement | runs |", "|---|---|---|---|---|---|---|"]
    for (label, t, _), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        e = rs[0]["ensemble"]
        tag = e["tag"] + (f" ({rs[0]['_source']})" if rs[0].get("_source") else "")
        lines.append(f"| {tag} | {t:g} | the ensemble | | {_fmt(e.get('test_top1'))} | "
                     f"{_fmt(_mean_std([r['ensemble'].get('agreement') for r in rs])[0])} | {len(rs)} |")
        for i, tc in enumerate(e["teachers"]):
            agr = _mean_std([r["ensemble"]["teachers"][i].get("agreement") for r in rs])[0]
            lines.append(f"| {tag} | {t:g} | {tc['label']} | {tc['weight']:.3g} | {_fmt(tc.get('test_top1'))} | "
                         f"{_fmt(agr)} | {len(rs)} |")
    return lines


def _num(x, spec="g") -> str:
    return "" if x is None else format(x, spec)


REPORT_FILES = ("report.md", "summary.json", "accuracy_vs_parameters.png", "accuracy.png", "learning_curves.png")


def _check_report_dir(out: Path) -> None:
    """Refuse an --out holding files of a report's names that no kdpipe report wrote (no summary.json of ours beside
    them): report --out . in a project folder replaced its own report.md without a word."""
    present = [f for f in REPORT_FILES if (out / f).exists()]
    if not present:
        return
    try:
        ours = {"groups", "runs"} <= set(json.loads((out / "summary.json").read_text()))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise KDPipeError(f"{out} holds {', '.join(present)}, which kdpipe report did not write (no summary.json of its "
                          "own beside them): give another --out")


def _label_datasets(runs: list[dict]) -> None:
    """Runs of one data spec stored otherwise (--image-size 32 and 64 of one photo folder, another --limit, the file
    changed since) are on other datasets: their test top-1 is measured on other test images. Their "dataset" gets
    what differs ("imagefolder:photos (64 px)"), so the report refuses to mix them unless --mix-datasets, and its
    rows tell them apart; the report took them for one dataset. Runs whose metrics record no data (before
    2026-12-07) keep the spec alone."""
    by_spec = defaultdict(list)
    for r in runs:
        if isinstance(r.get("data"), dict) and r["data"].get("fingerprint"):
            by_spec[r.get("dataset", "?")].append(r)
    for spec, group in by_spec.items():
        if len({r["data"]["fingerprint"] for r in group}) < 2:
            continue
        how = {"image_size": "{} px", "resize": "--resize {}", "limit": "--limit {}"}
        differ = [k for k in how if len({r["data"].get(k) for r in group}) > 1]
        labels = {}
        for r in group:
            parts = [how[k].format(r["data"][k]) if r["data"].get(k) is not None else f"no --{k.replace('_', '-')}"
                     for k in differ]
            labels[r["data"]["fingerprint"]] = ", ".join(parts)
        if len(set(labels.values())) < len(labels):  # stored alike, other contents: the data changed
            labels = {fp: f"data {fp[:8]}" for fp in labels}
        for r in group:
            r["dataset"] = f"{spec} ({labels[r['data']['fingerprint']]})"


def build_report(run_paths, out, mix_datasets: bool = False) -> dict:
    """report.md (the teacher(s), every finished run, each setting over its seeds, and the unfinished runs
    listed), summary.json and plots. Runs on more than one dataset are refused unless mix_datasets (then
    each table row names its dataset, as it always does)."""
    runs, unfinished = scan_runs(run_paths)
    _label_datasets(runs)
    _mark_sources(runs)
    _mark_variants(runs)
    datasets = sorted({r.get("dataset", "?") for r in runs})
    if len(datasets) > 1 and not mix_datasets:
        raise KDPipeError(f"the runs come from {len(datasets)} datasets ({', '.join(datasets)}): report each "
                          "dataset's runs apart, or pass --mix-datasets to put them in one table")
    _check_report_dir(Path(out))
    out = ensure_out_dir(out, "report directory")
    teachers = {}
    for r in runs:
        t = r.get("teacher") or {}
        if t.get("fingerprint"):
            # by dataset too: one teacher file dumped over one folder at two image sizes has a test top-1 on each
            teachers[t["fingerprint"], r.get("dataset", "?")] = {**t, "dataset": r.get("dataset", "?")}
        for t in (r.get("ensemble") or {}).get("teachers", []):  # every teacher of an ensemble
            teachers.setdefault((t["fingerprint"], r.get("dataset", "?")), {k: v for k, v in t.items() if k not in (
                "name", "label", "weight", "cache", "cache_id", "agreement")} | {"dataset": r.get("dataset", "?")})
    lines = ["# kdpipe report", ""]
    sizes = sorted({r["train_samples"] for r in runs if r.get("train_samples")})  # older metrics: absent
    lines += [f"Dataset: {', '.join(datasets)}. {len(runs)} student run(s)"
              + (f", trained on {' or '.join(f'{k:,}' for k in sizes)} samples" if sizes else "")
              + ". Training time is each run's own: its own steps plus an even share of the pass it shared with "
              "other runs.", ""]
    # what a latency is per: the teachers' inputs tell images (C, H, W) from a table's rows (D,)
    shapes = {len((r.get("teacher") or {}).get("image_shape") or ()) for r in runs}
    unit = "row" if shapes == {1} else "image" if shapes == {3} else "sample"
    # test errors beside test top-1 (papers give errors out of 10,000), where the runs record their test size
    # by dataset too, as `teachers` is: one teacher over --limit 100 and over the whole split has two test sizes
    tested = {}  # a teacher's test top-1 is on its cache's test split, the one its students are tested on
    for r in (r for r in runs if r.get("test_samples")):
        for fp in [(r.get("teacher") or {}).get("fingerprint")] + [t["fingerprint"] for t in (r.get("ensemble") or {}).get("teachers", [])]:
            tested.setdefault((fp, r.get("dataset", "?")), r["test_samples"])
    errors = " (errors)" if tested else ""
    lines += [_latency_note(list(teachers.values()) + runs), ""]
    place = _latency_tags(list(teachers.values()) + runs)
    lines += [f"| model | role | loss | T | alpha | optimizer | lr | epochs | seed | dataset | test top-1{errors} | "
              f"agreement with teacher | best epoch (val top-1; its test top-1) | parameters | MB | CPU latency (ms/{unit}) | "
              "training time (s) | run |",
              "|" + "---|" * 18]
    for t in teachers.values():
        lines.append(f"| {t.get('arch')} | teacher | | | | | | | | {t['dataset']} | {_fmt(t.get('test_top1'))}"
                     f"{_errors(t.get('test_top1'), tested.get((t.get('fingerprint'), t['dataset'])))} | 1.0000 | "
                     f"| {t.get('parameters', 0):,} | {t.get('file_bytes', 0) / 1e6:.2f} | "
                     f"{_fmt(t.get('cpu_latency_ms'), '.3f')}{place(t)} | | |")
    order = sorted(runs, key=lambda r: (r.get("dataset", "?"), r["arch"], _loss(r), r["alpha"] or 0,
                                        r["temperature"] or 0, _setting(r), r["seed"]))
    for r in order:
        best = r.get("best")
        lines.append(f"| {r['arch']}{_variant(r)} | {_role(r)} | {_loss(r)} | "
                     f"{'' if _scratch(r) else _num(r['temperature'])} | {_num(r['alpha'])} | "
                     f"{r.get('optimizer', 'sgd')} | "
                     f"{_num(r.get('lr'))} | {r.get('epochs', '')} | {r['seed']} | {r.get('dataset', '?')} | "
                     f"{_fmt(r.get('test_top1'))}{_errors(r.get('test_top1'), r.get('test_samples'))}{_diverged(r)} | "
                     f"{_fmt(r.get('teacher_agreement'))} | "
                     f"{_best(best)} | "
                     f"{r['parameters']:,} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{_fmt(r.get('cpu_latency_ms'), '.3f')}{place(r)} | {_train_s(r):.1f} | `{r['name']}` |")
    groups = defaultdict(list)
    for r in runs:
        groups[(r.get("dataset", "?"), _setting(r))].append(r)
    summary = []
    for (dataset, setting), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _group_order(kv[1][0]), kv[0][1])):
        acc, acc_sd = _mean_std([r.get("test_top1") for r in rs])
        agr, agr_sd = _mean_std([r.get("teacher_agreement") for r in rs])
        r0 = rs[0]
        summary.append({"setting": setting, "dataset": dataset, "arch": r0["arch"], "variant": r0.get("_variant"),
                        "loss": _loss(r0),
                        "scratch": _scratch(r0), "alpha": r0["alpha"],
                        "temperature": None if _scratch(r0) else r0["temperature"],
                        "optimizer": r0.get("optimizer", "sgd"), "lr": r0.get("lr"), "epochs": r0.get("epochs"),
                        "seeds": sorted(r["seed"] for r in rs), "n": len(rs),
                        "test_top1_mean": acc, "test_top1_std": acc_sd, "agreement_mean": agr,
                        "agreement_std": agr_sd, "parameters": r0["parameters"],
                        "train_s_mean": statistics.fmean(_train_s(r) for r in rs),
                        "diverged": sum(bool(r.get("diverged_epoch")) for r in rs)})
    if any(s["n"] > 1 for s in summary):
        lines += ["", "Each setting over its seeds (mean ± sample std; n runs):", "",
                  "| model | role | loss | T | alpha | optimizer | lr | epochs | dataset | n | test top-1 | agreement | "
                  "training time (s, mean) | setting |",
                  "|" + "---|" * 14]
        for s in summary:
            lines.append(f"| {s['arch']}{_variant({'_variant': s['variant']})} | "
                         f"{'scratch' if s['scratch'] else 'KD'} | {s['loss']} | "
                         f"{_num(s['temperature'])} | {_num(s['alpha'])} | {s['optimizer']} | {_num(s['lr'])} | "
                         f"{s['epochs'] or ''} | {s['dataset']} | {s['n']} | "
                         f"{_pm(s['test_top1_mean'], s['test_top1_std'])}{_diverged_runs(s['diverged'])}"
                         + f" | {_pm(s['agreement_mean'], s['agreement_std'])} | "
                         f"{s['train_s_mean']:.1f} | `{s['setting']}` |")
    lines += _ensembles(runs)
    versus = versus_scratch(groups)
    if versus:
        # optimizer, lr and epochs as in the table above, and the two settings by name: KD settings that differ
        # only there (an --lr sweep, two caches, a batch size) gave rows that could not be told apart
        lines += ["", "KD against its scratch twin (same architecture, training settings and seeds; a clear gain "
                  "is a positive mean gain of at least twice the larger of the two sample standard deviations):", "",
                  "| model | loss | T | alpha | optimizer | lr | epochs | seeds | gain in test top-1 | 2 × larger std "
                  "| wins | clear gain | KD setting vs scratch twin |",
                  "|" + "---|" * 13]
        for v in versus:
            on = _on(v["dataset"], len(datasets) > 1)
            lines.append(f"| {v['arch']}{_variant({'_variant': v['variant']})} | {v['loss']} | "
                         f"{_num(v['temperature'])} | {_num(v['alpha'])} | {v['optimizer']} | {_num(v['lr'])} | "
                         f"{v['epochs'] or ''} | "
                         f"{len(v['seeds'])} | {v['gain']:+.4f}{_diverged_runs(v['diverged'])} | "
                         f"{2 * v['larger_std']:.4f} | "
                         f"{v['wins']}/{len(v['seeds'])} | {'yes' if v['clear'] else 'no'} | "
                         f"`{v['setting']}` vs `{v['scratch_setting']}`{on} |")
    if unfinished:
        lines += ["", "Unfinished (not in the tables above; their train-student command, run again, resumes them): "
                  + ", ".join(f"`{Path(u).name}`" for u in unfinished) + "."]
    plots = _plots(runs, summary, list(teachers.values()), out)
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    atomic_write_json(out / "summary.json", {"teachers": list(teachers.values()), "groups": summary,
                                             "versus_scratch": versus,
                                             "runs": [{k: v for k, v in r.items() if k != "teacher"} for r in runs],
                                             "unfinished": unfinished})
    return {"report": str(out / "report.md"), "plots": [str(p) for p in plots], "runs": len(runs),
            "unfinished": unfinished}


def _latency_places(records) -> list[str]:
    """Where the latencies of `records` (teachers' and runs' dicts) were measured, in order: kdpipe.evaluate.cpu_name()
    as dump-logits or train-student recorded it, "" where the record has none (written by an earlier kdpipe)."""
    return list(dict.fromkeys(x.get("cpu_latency_on") or "" for x in records if x.get("cpu_latency_ms") is not None))


def _latency_note(records) -> str:
    """The report's line on its latency column, which holds two commands' measurements: a teacher's, taken by
    dump-logits, and a student's, by train-student, each on the machine and with the torch threads it ran with
    (the column set them side by side as one measurement). Where they were taken on more than one machine or thread
    count, each place gets a tag ([m1], ...) that the column's cells carry."""
    places = _latency_places(records)
    said = ("CPU latency: the median of repeated forward passes at batch 1, measured by the command that wrote each "
            "row's record: a teacher's by dump-logits (when it cached the teacher's logits), a student's by "
            "train-student (at the end of its run)")
    if not places:
        return said + "."
    if len(places) == 1:
        return said + (f", on {places[0]}." if places[0] else "; where is not recorded (written by an earlier kdpipe).")
    return (said + ", on more than one machine or thread count, so compare them only among rows of one tag: "
            + "; ".join(f"[m{i + 1}] {p or 'not recorded (written by an earlier kdpipe)'}" for i, p in enumerate(places))
            + ".")


def _latency_tags(records):
    """record -> the tag of the place its latency was measured ("" where all were measured in one place)."""
    places = _latency_places(records)
    if len(places) < 2:
        return lambda x: ""
    return lambda x: ("" if x.get("cpu_latency_ms") is None else
                      f" [m{places.index(x.get('cpu_latency_on') or '') + 1}]")


def _group_order(r):
    return (r["arch"], _loss(r), r["alpha"] or 0, r["temperature"] or 0)


# config.json keys of a run's teacher and loss: what a KD run and its scratch twin differ in (the rest must match)
_TEACHER_SETTINGS = ("loss", "temperature", "alpha", "hint")


def _twin_key(r):
    """What a KD run and its scratch twin share: the data, the architecture, how they trained (every setting of
    config.json but the loss's: batch size, schedule, weight decay, --arch-args, ..., which run names leave out
    or only hash), and the cache whose views they saw (where the report holds several). Not the "_variant" label:
    it names what differs among the runs of one name, so a KD setting of two variants and its scratch twin of one
    were labelled apart though their settings matched (`training` compares those settings themselves)."""
    training = tuple(sorted((k, v) for k, v in _config_settings(r).items()
                            if k.split(".")[0] not in _TEACHER_SETTINGS))
    return (r.get("dataset", "?"), r["arch"], r.get("optimizer", "sgd"), r.get("lr"), r.get("epochs"),
            r.get("train_samples"), json.dumps(r.get("training", {}).get("val_fraction")),
            bool(r.get("training", {}).get("val_split")), r.get("_source", ""), training)


def versus_scratch(groups) -> list[dict]:
    """Each KD setting (groups: (dataset, setting) -> its runs) against the scratch runs of its architecture
    and training settings, over the seeds both have (at least 2): the mean gain in test top-1, the larger
    sample std of the two, the seeds where KD won, whether the gain is clear (above 0 and at least twice the larger
    std: seeds that all score alike have std 0, and no gain is not a clear one),
    and how many of the compared runs (KD and scratch) diverged."""
    scratch = defaultdict(list)
    for rs in groups.values():
        if _scratch(rs[0]):
            scratch[_twin_key(rs[0])].append(rs)
    out = []
    for (dataset, setting), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _group_order(kv[1][0]), kv[0][1])):
        twins = scratch.get(_twin_key(rs[0]), [])
        if _scratch(rs[0]) or len(twins) != 1:
            continue
        kd = {r["seed"]: r.get("test_top1") for r in rs}
        base = {r["seed"]: r.get("test_top1") for r in twins[0]}
        seeds = sorted(s for s in kd.keys() & base.keys() if kd[s] is not None and base[s] is not None)
        if len(seeds) < 2:
            continue
        (kd_mean, kd_std), (sc_mean, sc_std) = (_mean_std([d[s] for s in seeds]) for d in (kd, base))
        larger = max(kd_std, sc_std)
        r0, gain = rs[0], kd_mean - sc_mean
        out.append({"setting": setting, "scratch_setting": _setting(twins[0][0]), "dataset": dataset,
                    "arch": r0["arch"], "variant": r0.get("_variant"), "loss": _loss(r0), "alpha": r0["alpha"],
                    "temperature": r0["temperature"], "optimizer": r0.get("optimizer", "sgd"), "lr": r0.get("lr"),
                    "epochs": r0.get("epochs"), "seeds": seeds, "gain": gain, "larger_std": larger,
                    "wins": sum(kd[s] > base[s] for s in seeds), "clear": gain > 0 and gain >= 2 * larger,
                    "diverged": sum(bool(r.get("diverged_epoch")) for r in rs + twins[0] if r["seed"] in seeds)})
    return out


# Plots stay readable with many runs: settings, not runs, get colours and labels; seeds of a setting share
# its colour; learning curves are faceted by architecture; names are written on points only up to this many.
MAX_LABELS = 6


def _plots(runs, summary, teachers, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [_accuracy_vs_parameters(plt, summary, teachers, out), _accuracy_bars(plt, summary, teachers, out)]
    curves = _learning_curves(plt, runs, teachers, out)
    if curves is not None:
        paths.append(curves)
    else:  # an earlier report's curves (of other runs) beside a report.md that does not show them
        (out / "learning_curves.png").unlink(missing_ok=True)
    return paths


def _colors(plt, keys):
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _accuracy_vs_parameters(plt, summary, teachers, out):
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for role, marker in (("scratch", "s"), ("KD", "o")):
        ss = [s for s in summary if s["scratch"] == (role == "scratch") and s["test_top1_mean"] is not None]
        if ss:
            ax.errorbar([s["parameters"] for s in ss], [s["test_top1_mean"] for s in ss],
                        yerr=[s["test_top1_std"] or 0 for s in ss], fmt=marker, capsize=3, label=f"student ({role})")
    for t in teachers:
        if t.get("test_top1") is not None:
            ax.scatter([t["parameters"]], [t["test_top1"]], marker="*", s=200, c="k", label=f"teacher {t['arch']}")
    if len(summary) <= MAX_LABELS:
        several = len({s["dataset"] for s in summary}) > 1
        for s in summary:
            if s["test_top1_mean"] is not None:
                ax.annotate(s["setting"] + _on(s["dataset"], several), (s["parameters"], s["test_top1_mean"]),
                            fontsize=6, xytext=(4, 2),
                            textcoords="offset points")
    sizes = [s["parameters"] for s in summary] + [t["parameters"] for t in teachers if t.get("parameters")]
    if sizes and max(sizes) > 10 * min(sizes):  # a log axis only where it spans a decade (else no ticks)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("parameters")
    ax.set_ylabel("test top-1 (mean ± std over seeds)")
    ax.set_title("accuracy against parameters" + ("" if len(summary) <= MAX_LABELS else
                                                  f" ({len(summary)} settings; see the table for names)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "accuracy_vs_parameters.png"
    atomic_write_stream(p, lambda f: fig.savefig(f, dpi=120, format="png"))  # a full disk: one line
    plt.close(fig)
    return p


def _accuracy_bars(plt, summary, teachers, out):
    """Horizontal bars, one per setting (mean over seeds, std as error bar), teachers first; the axis starts
    at 0 and every bar carries its value, so small differences are read from the numbers, not the lengths."""
    several = len({s["dataset"] for s in summary}) > 1
    labels = [f"teacher {t['arch']}" for t in teachers] + [f"{s['setting']}{_on(s['dataset'], several)} (n={s['n']})"
                                                           for s in summary]
    means = [t.get("test_top1") or 0 for t in teachers] + [s["test_top1_mean"] or 0 for s in summary]
    errs = [0] * len(teachers) + [s["test_top1_std"] or 0 for s in summary]
    colors = ["k"] * len(teachers) + ["tab:gray" if s["scratch"] else "tab:blue" for s in summary]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * len(labels) + 1.2)))
    y = list(range(len(labels)))
    ax.barh(y, means, xerr=errs, color=colors, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    for yi, m, e in zip(y, means, errs):
        ax.text(m + e + 0.01, yi, f"{m:.4f}", va="center", fontsize=7)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("test top-1 (axis from 0)")
    ax.set_title("teacher vs students (black: teacher, grey: scratch, blue: KD)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    p = out / "accuracy.png"
    atomic_write_stream(p, lambda f: fig.savefig(f, dpi=120, format="png"))  # a full disk: one line
    plt.close(fig)
    return p


def _learning_curves(plt, runs, teachers, out):
    """Test top-1 against epoch, one line per run, one panel per architecture; seeds of a setting share a
    colour and one legend entry; each panel's teacher (of its dataset) is a dashed horizontal line."""
    from matplotlib.ticker import MaxNLocator
    runs = [r for r in runs if any(h.get("test_top1") is not None for h in r.get("history", []))]
    if not runs:
        return None
    several = len({r.get("dataset", "?") for r in runs}) > 1

    def setting(r):  # runs of one setting on two datasets are not seeds of one setting
        return _setting(r) + _on(r.get("dataset", "?"), several)
    archs = sorted({r["arch"] for r in runs})
    cols = min(3, len(archs))
    rows = (len(archs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, arch in zip(axes.flat, archs):
        mine = [r for r in runs if r["arch"] == arch]
        settings = list(dict.fromkeys(setting(r) for r in sorted(mine, key=lambda r: (_group_order(r), setting(r)))))
        color = _colors(plt, settings)
        done = set()
        for r in mine:
            h = [e for e in r["history"] if e.get("test_top1") is not None]
            key = setting(r)
            ax.plot([e["epoch"] for e in h], [e["test_top1"] for e in h], color=color[key], lw=1.2, alpha=0.85,
                    ls="--" if _scratch(r) else "-", label=None if key in done else key.removeprefix(arch_label(arch) + "-"))
            done.add(key)
        for t in teachers:
            if t.get("test_top1") is not None and t["dataset"] in {r.get("dataset", "?") for r in mine}:
                ax.axhline(t["test_top1"], color="k", lw=1, ls=":", label=f"teacher {t['arch']}")
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if len(settings) <= 10 else 5, ncol=1 if len(settings) <= 10 else 2)
    for ax in list(axes.flat)[len(archs):]:
        ax.axis("off")
    fig.suptitle("learning curves (dashed: scratch; dotted: teacher; seeds share a colour)", fontsize=10)
    fig.tight_layout()
    p = out / "learning_curves.png"
    atomic_write_stream(p, lambda f: fig.savefig(f, dpi=120, format="png"))  # a full disk: one line
    plt.close(fig)
    return p
