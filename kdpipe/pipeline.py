"""Pipelines: a TOML spec of a whole experiment, turned into Make rules with real file targets.

    teacher:  runs/<name>/teacher.pt                          (train-teacher, unless [teacher].file is given)
    cache:    cache/<name>/manifest.json                       (dump-logits)
    (an ensemble, [[teacher]] entries with a name each: runs/<name>/teacher-<t>.pt and cache/<name>/<t>/, the
     second and later dumped with --like the first's cache; students in runs/<name>/students/<t1>+<t2>/)
    students: runs/<name>/students/<run>/metrics.json           (one train-student call per [[students]] block;
                                                                 a grouped target: one pass trains the block;
                                                                 precious: a rerun skips finished runs and
                                                                 resumes the others from their checkpoint)
    report:   runs/<name>/report/report.md                     (report)
    compress: runs/<name>/compress/compress.md                 (compress, only with a [compress] section)

A file the pipeline is given ([teacher] file, the npz or CSV file of [data] spec, the PATH.py of an arch) is a
prerequisite of the steps that read it (edited, they rerun) with a rule that names it in one line when it is missing.
"""

from __future__ import annotations

import difflib
import re
import shlex
import tomllib
from pathlib import Path

from kdpipe import KDPipeError
from kdpipe.sweep import (STUDENT_BATCH_SIZE, check_alias_options, check_optimizer_uses, ensemble_tag,
                          parse_arch_args, parse_loss, plan_sweep)

# Optimizer and schedule keys, as train-teacher's and train-student's options (kdpipe.sweep.resolve_training).
_OPTIM_FLAGS = {"optimizer": "optimizer", "lr": "lr", "momentum": "momentum", "weight_decay": "weight-decay",
                "betas": "betas", "eps": "eps", "schedule": "schedule", "warmup_epochs": "warmup-epochs"}
# arch and archs are kdpipe.models specs (kdpipe:NAME, tv:NAME, timm:NAME, path/nets.py:Factory,
# package.module:Factory); arch_args is "k=v,..." or a table. A [teacher] with file = "..." is loaded, not
# trained: with arch too, the file is a state dict or safetensors file that arch fills; mean/std,
# input_range or normalize give the input normalization of a teacher that is not a kdpipe checkpoint.
_TEACHER_KEYS = {"arch", "arch_args", "epochs", "batch_size", "policy", "padding", "size", "seed", "device", "file",
                 "output", "trust_pickle", "mean", "std", "input_range", "normalize",
                 "checkpoint_every"} | set(_OPTIM_FLAGS)
# The keys of a teacher trained here, and of one loaded from [teacher] file: each is refused with the other.
_TRAIN_KEYS = {"epochs", "batch_size", "policy", "padding", "size", "seed", "device",
               "checkpoint_every"} | set(_OPTIM_FLAGS)
_LOAD_KEYS = {"output", "trust_pickle", "mean", "std", "input_range", "normalize"}
# limit: only N samples of each split, drawn from a fixed seed (quick end-to-end checks); prepare: a command that writes
# the npz:PATH file of the spec (a rule of its own, run when the file is missing).
# image_size: photos decoded to S x S (--image-size; the image store's photo kind); resize: how (--resize MODE:
# crop, squash, crop:R, with :bilinear; "squash:bilinear" for a teacher evaluated on torchvision's Resize((S, S))).
_DATA_KEYS = {"spec", "root", "limit", "prepare", "image_size", "resize"}
# features: teacher layers cached for hint losses (dump-logits --features); hint_layer / hint_feature: a students
# block's --hint-layer and --hint-feature (a loss with a hint term, e.g. loss = "kd:1,hint:50").
_DUMP_KEYS = {"views", "policy", "padding", "size", "seed", "logits_dtype", "batch_size", "shard_rows", "device", "amp",
              "yes", "force", "codec", "temperatures", "features"}
_COMPRESS_KEYS = {"quantize", "backend", "calibration", "prune", "sparsity", "finetune_epochs", "finetune_loss",
                  "finetune_samples", "lr", "repeats", "seed", "device"}
# teachers / teacher_weights: in a pipeline with [[teacher]] entries, the block's teachers by name (default: all of
# them, in their order; two or more are an ensemble, the first its primary) and their weights (train-student's
# --teacher-weights; default equal).
_STUDENT_KEYS = {"archs", "arch_args", "epochs", "loss", "temperature", "alpha", "seed", "batch_size", "device",
                 "val_fraction", "val_split", "train_samples", "checkpoint_every", "keep_checkpoints", "hint_layer",
                 "hint_feature", "teachers", "teacher_weights"} | set(_OPTIM_FLAGS)
_TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a [[teacher]] entry's name: part of file names and Make targets
# A file the pipeline is given ([teacher] file, the npz that [data] prepare writes) is a Make target, and is written
# unquoted in the steps' command lines: no space, parenthesis, quote, '$', ':', '#', '%', '=', '*', ... in it.
_MAKE_PATH = re.compile(r"[A-Za-z0-9_./+,@~-]+")


def _check_make_path(path, where: str, file: str) -> None:
    if not _MAKE_PATH.fullmatch(file):
        raise KDPipeError(f"{path}: {where} {file!r} is a Make target, and make cannot take a space or any of "
                          "()'\"$:#%;=*?[]\\ in one: rename the file, or link it under a plain name (ln -s), and give "
                          "that")


# The pipeline's own keys and sections; its name is part of every file name and Make target, as a teacher's.
_TOP_KEYS = {"name", "data", "teacher", "dump", "students", "compress"}
# The types of the keys that the Make rules build file names from or pass on as numbers: a quoted number
# (epochs = "10") would name other Make targets than the runs train-student writes, or fail only when its step
# runs. int: a whole number; float: any number; str, bool; a list [kind]: one such value or a list of them
# (a sweep axis). Keys not listed take what their command line option takes (checked when the step runs).
_INT, _NUM = "int", "float"
_TYPES = {
    "data": {"spec": str, "root": str, "limit": _INT, "image_size": _INT, "resize": str, "prepare": str},
    "teacher": {"arch": str, "file": str, "epochs": _INT, "batch_size": _INT, "seed": _INT, "padding": _INT,
                "size": _INT, "policy": str, "device": str, "trust_pickle": bool, "checkpoint_every": _NUM,
                "optimizer": str, "lr": _NUM, "momentum": _NUM, "weight_decay": _NUM, "eps": _NUM,
                "schedule": str, "warmup_epochs": _NUM, "normalize": str, "output": str},
    "dump": {"views": _INT, "padding": _INT, "size": _INT, "seed": _INT, "batch_size": _INT, "shard_rows": _INT,
             "policy": str, "logits_dtype": str, "codec": str, "device": str, "amp": bool, "yes": bool,
             "force": bool},
    "students": {"archs": [str], "epochs": _INT, "batch_size": _INT, "seed": [_INT], "temperature": [_NUM],
                 "alpha": [_NUM], "lr": [_NUM], "loss": str, "train_samples": _INT, "val_fraction": _NUM,
                 "val_split": bool, "checkpoint_every": _NUM, "keep_checkpoints": bool, "device": str,
                 "optimizer": str, "momentum": _NUM, "weight_decay": _NUM, "eps": _NUM, "schedule": str,
                 "warmup_epochs": _NUM, "hint_layer": str, "hint_feature": str},
    "compress": {"calibration": _INT, "finetune_epochs": _INT, "finetune_samples": _INT, "repeats": _INT,
                 "seed": _INT, "lr": _NUM, "backend": str, "finetune_loss": str, "device": str,
                 "quantize": [str], "prune": [str], "sparsity": [_NUM]},
}
_KIND_WORDS = {_INT: "a whole number", _NUM: "a number", str: "a string in quotes", bool: "true or false"}
_KIND_PLURALS = {_INT: "whole numbers", _NUM: "numbers", str: "strings in quotes", bool: "true or false"}


def _type_fault(value, kind) -> str | None:
    """What a value is not, of the kinds of _TYPES, or None when it fits."""
    if isinstance(kind, list):
        if isinstance(value, list):
            if not value:
                return "a value or a non-empty list"
            return next((f"a list of {_KIND_PLURALS[kind[0]]}" for v in value if _type_fault(v, kind[0])), None)
        return _type_fault(value, kind[0]) and f"{_KIND_WORDS[kind[0]]} or a list of them"
    fits = {_INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
            _NUM: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(kind, lambda v: isinstance(v, kind))
    return None if fits(value) else _KIND_WORDS[kind]


def _check_types(path, where: str, table: dict, section: str) -> None:
    for key, kind in _TYPES[section].items():
        if key not in table:
            continue
        fault = _type_fault(table[key], kind)
        if fault:
            v = table[key]
            quoted = any(isinstance(x, str) for x in (v if isinstance(v, list) else [v]))
            hint = ": write it without quotes" if quoted and kind not in (str, [str]) else ""
            raise KDPipeError(f"{path}: {where} {key} must be {fault}, got {v!r}{hint}")


def _unknown_keys(path, where: str, unknown: set, keys: set) -> KDPipeError:
    """The one line for keys a section does not take: each with the key it is likely a typo of, or the section it
    belongs in; else the keys the section takes (so that a misspelt or misplaced key says what to write)."""
    sections = {"[data]": _DATA_KEYS, "[teacher]": _TEACHER_KEYS, "[dump]": _DUMP_KEYS, "[[students]]": _STUDENT_KEYS,
                "[compress]": _COMPRESS_KEYS}

    def hint(k):
        close = difflib.get_close_matches(k, sorted(keys), n=1, cutoff=0.7)
        home = [name for name, ks in sections.items() if k in ks]
        return f"did you mean {close[0]}?" if close else f"a key of {' or '.join(home)}" if home else None

    hints = {k: hint(k) for k in sorted(unknown)}
    if all(hints.values()):
        said = ", ".join(f"{k} ({h})" for k, h in hints.items())
    else:
        said = f"{', '.join(sorted(unknown))} ({where.split(' #')[0]} takes {', '.join(sorted(keys))})"
    return KDPipeError(f"{path}: unknown key(s) in {where}: {said}")


def load_pipeline(path) -> dict:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KDPipeError(f"no pipeline file {path}") from None
    except UnicodeDecodeError:
        raise KDPipeError(f"{path} is not a text file: give a pipeline's TOML file (e.g. pipelines/default.toml)") \
            from None
    except OSError as e:  # a folder ('' is the current one), a file it may not read
        raise KDPipeError(f"cannot read the pipeline file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise KDPipeError(f"{path} is not valid TOML: {e}") from None
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise KDPipeError(f"{path}: unknown key(s) or section(s): {', '.join(sorted(unknown))} (a pipeline has name, "
                          "[data], [teacher] or [[teacher]] entries, [dump], [[students]] blocks and [compress])")
    spec.setdefault("name", path.stem)
    name = spec["name"]
    if not isinstance(name, str) or not _TEACHER_NAME.fullmatch(name) or name in (".", ".."):
        raise KDPipeError(f"{path}: name must be letters, digits, '_', '.' or '-' (it names runs/<name>/ and "
                          f"cache/<name>/, and Make targets), got {name!r}")
    for section in ("data", "dump", "compress"):
        if section in spec and not isinstance(spec[section], dict):
            raise KDPipeError(f"{path}: [{section}] must be one table, written [{section}]")
    for section, keys in (("dump", _DUMP_KEYS), ("compress", _COMPRESS_KEYS)):
        if section not in spec:
            if section == "compress":  # optional
                continue
            raise KDPipeError(f"{path}: missing [{section}]")
        unknown = set(spec[section]) - keys
        if unknown:
            raise _unknown_keys(path, f"[{section}]", unknown, keys)
        _check_types(path, f"[{section}]", spec[section], section)
    _check_policy(path, "[dump]", spec["dump"])
    names = _check_teachers(path, spec)
    if "data" not in spec or "spec" not in spec["data"]:
        raise KDPipeError(f"{path}: missing [data] spec = \"...\"")
    unknown = set(spec["data"]) - _DATA_KEYS
    if unknown:
        raise _unknown_keys(path, "[data]", unknown, _DATA_KEYS)
    _check_types(path, "[data]", spec["data"], "data")
    for key in ("limit", "image_size"):  # 0 was dropped from the command lines: limit = 0 ran on all the data
        if key in spec["data"] and spec["data"][key] < 1:
            raise KDPipeError(f"{path}: [data] {key} must be 1 or more, got {spec['data'][key]} (delete the line for "
                              f"{'all the data' if key == 'limit' else 'the images as stored'})")
    if "prepare" in spec["data"] and not str(spec["data"]["spec"]).startswith("npz:"):
        raise KDPipeError(f"{path}: [data] prepare makes the file of an npz:PATH spec; this spec is "
                          f"{spec['data']['spec']!r}")
    if "prepare" in spec["data"]:
        _check_make_path(path, "[data] prepare's file", spec["data"]["spec"].removeprefix("npz:"))
    if not spec.get("students"):
        raise KDPipeError(f"{path}: needs at least one [[students]] block")
    if not isinstance(spec["students"], list) or not all(isinstance(b, dict) for b in spec["students"]):
        raise KDPipeError(f"{path}: students are [[students]] blocks (two brackets), not [students] or a key")
    for i, block in enumerate(spec["students"]):
        if "name" in block:  # taken, and named nothing: the runs kept their names from their settings
            raise KDPipeError(f"{path}: [[students]] #{i + 1} name = {block['name']!r} would name nothing: a block's "
                              "runs are named by their settings (e.g. mlp_100-T2-a0.9-e30-s0, see Run names in "
                              "README.md): delete the line (a # comment labels a block)")
        unknown = set(block) - _STUDENT_KEYS
        if unknown:
            raise _unknown_keys(path, f"[[students]] #{i + 1}", unknown, _STUDENT_KEYS)
        _check_types(path, f"[[students]] #{i + 1}", block, "students")
        check_optimizer_uses(block.get("optimizer"), block, f"{path}: [[students]] #{i + 1} ", flag="")
        if not block.get("archs") or not block.get("epochs"):
            raise KDPipeError(f"{path}: [[students]] #{i + 1} needs archs = [...] and epochs = N")
        _check_block_teachers(path, spec, block, i, names)
    return spec


def _check_policy(path, where: str, table: dict) -> None:
    """padding and size set the options of the crop-flip and resized-crop-flip aliases: refused with another policy
    (which ignored them), before any step runs."""
    check_alias_options(table.get("policy", "crop-flip"), {k: table[k] for k in ("padding", "size") if k in table},
                        where=f"{path}: {where} ")


def _check_teachers(path, spec: dict) -> list[str] | None:
    """[teacher] (one teacher), or [[teacher]] entries (an ensemble's teachers, each with a name). Returns the
    entries' names, None for a [teacher] table."""
    if "teacher" not in spec:
        raise KDPipeError(f"{path}: missing [teacher]")
    entries = spec["teacher"]
    if isinstance(entries, dict):
        entries, label, names = [entries], lambda i: "[teacher]", None
    else:
        label, names = (lambda i: f"[[teacher]] #{i + 1}"), []
        if not entries:
            raise KDPipeError(f"{path}: [[teacher]] holds no entry")
    if not all(isinstance(t, dict) for t in entries):
        raise KDPipeError(f"{path}: the teacher is a [teacher] table, or [[teacher]] entries for an ensemble")
    for i, t in enumerate(entries):
        unknown = set(t) - _TEACHER_KEYS - ({"name"} if names is not None else set())
        if unknown:
            raise _unknown_keys(path, label(i), unknown, _TEACHER_KEYS | ({"name"} if names is not None else set()))
        _check_types(path, label(i), t, "teacher")
        check_optimizer_uses(t.get("optimizer"), t, f"{path}: {label(i)} ", flag="")
        _check_policy(path, label(i), t)
        if "file" not in t and "arch" not in t:
            raise KDPipeError(f"{path}: {label(i)} needs arch = \"...\" (to train one) or file = \"...\" (to load "
                              "one)")
        # keys of the other way to get a teacher were dropped from the command lines without a word
        ignored = sorted(set(t) & (_TRAIN_KEYS if "file" in t else _LOAD_KEYS))
        if ignored:
            raise KDPipeError(f"{path}: {label(i)} " + (
                f"file is a given teacher, not trained here, so {', '.join(ignored)} would be ignored: delete them"
                if "file" in t else f"trains a teacher ({t['arch']}), so {', '.join(ignored)} (keys of a given "
                "teacher file, file = \"...\") would be ignored: delete them"))
        if "file" in t:
            _check_make_path(path, f"{label(i)} file", t["file"])
        if names is None:
            continue
        name = t.get("name")
        if not isinstance(name, str) or not _TEACHER_NAME.fullmatch(name) or name in (".", ".."):
            raise KDPipeError(f"{path}: {label(i)} needs name = \"...\" (letters, digits, '_', '.', '-'), which "
                              f"names its teacher file and cache; got {name!r}")
        if name in names:
            raise KDPipeError(f"{path}: two [[teacher]] entries are named {name!r}: give each its own name")
        names.append(name)
    t0 = entries[0]
    program = "arch" not in t0 and bool(set(t0) & {"trust_pickle", "mean", "std", "input_range", "normalize"})
    if names is None and "compress" in spec and "file" in t0 and (program or t0.get("trust_pickle")):
        # failed at the last step, once the teacher was cached and every student trained. A state dict (file with
        # arch) is compressed with its arch and normalization; a program (TorchScript, ...) or pickle cannot be
        raise KDPipeError(f"{path}: [compress] takes a kdpipe checkpoint teacher, or a state dict with arch and its "
                          "normalization, and [teacher] gives a file without arch (TorchScript, a pickled module, "
                          "...), which compress cannot prune or quantize: drop [compress], or train the teacher here "
                          "(arch, epochs, ...)")
    if names is not None and "compress" in spec:
        raise KDPipeError(f"{path}: [compress] compares students with one teacher, and this pipeline has "
                          f"{len(names)} ([[teacher]]): run `kdpipe compress --teacher FILE --students DIR` for the "
                          "teacher you mean, or drop [compress]")
    return names


def _check_block_teachers(path, spec: dict, block: dict, i: int, names: list[str] | None) -> None:
    """A students block's teachers and teacher_weights (see _STUDENT_KEYS), refused in one line if wrong."""
    where = f"{path}: [[students]] #{i + 1}"
    if names is None:
        for key in ("teachers", "teacher_weights"):
            if key in block:
                raise KDPipeError(f"{where}: {key} picks among [[teacher]] entries; this pipeline has one "
                                  "[teacher]")
        return
    chosen = _listify(block.get("teachers", names))
    unknown = [n for n in chosen if n not in names]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise KDPipeError(f"{where}: teachers = {chosen!r} must name [[teacher]] entries, each once (the "
                          f"pipeline's: {', '.join(names)})")
    if len(chosen) > 1:
        if str(spec["dump"].get("codec", "dense")).startswith("topk"):
            raise KDPipeError(f"{where}: an ensemble of teachers mixes dense logits, and [dump] codec is "
                              f"{spec['dump']['codec']!r}: drop the codec or give the block one teacher")
        if "hint" in parse_loss(block.get("loss", "kd"))[0].split("+"):
            raise KDPipeError(f"{where}: a hint loss distils one teacher's features: give the block one teacher "
                              "(teachers = [\"...\"])")
    weights = block.get("teacher_weights")
    if weights is not None:
        if len(chosen) < 2:
            raise KDPipeError(f"{where}: teacher_weights weighs the teachers of an ensemble, and the block has one "
                              f"teacher ({chosen[0]})")
        try:
            ensemble_tag(len(chosen), _listify(weights))
        except (KDPipeError, TypeError, ValueError) as e:
            raise KDPipeError(f"{where}: teacher_weights: {e}") from None


def _opts(d: dict, mapping: dict[str, str]) -> list[str]:
    out = []
    for key, flag in mapping.items():
        if key not in d:
            continue
        v = d[key]
        if isinstance(v, bool):
            out.append(f"--{flag}" if v else f"--no-{flag}")
        elif isinstance(v, list):
            out += [f"--{flag}", ",".join(str(x) for x in v)]
        else:
            out += [f"--{flag}", str(v)]
    return out


def _arch_args(d: dict, where: str) -> list[str]:
    """--arch-args from a block's arch_args: a "k=v,..." string or a TOML table; `where` names the block."""
    v = d.get("arch_args")
    if not v:
        return []
    if isinstance(v, dict):  # each value must survive "k=v,..." (a list or a comma gave a refusal at make time,
        for k, x in v.items():  # after the steps before it had run)
            if not isinstance(x, (bool, int, float, str)) or (isinstance(x, str) and ("," in x or "=" in x)):
                raise KDPipeError(f"{where} arch_args.{k} = {x!r}: --arch-args carries numbers, true/false and "
                                  "words without ',' or '=' only")
        v = ",".join(f"{k}={str(x).lower() if isinstance(x, bool) else x}" for k, x in v.items())
    try:
        parse_arch_args(str(v))  # its syntax, before any step runs
    except KDPipeError as e:
        raise KDPipeError(f"{where} arch_args: {e}") from None
    return ["--arch-args", str(v)]


def _listify(v):
    return v if isinstance(v, list) else [v]


def make_rules(spec: dict, stamp_dir: str | None = None) -> str:
    """Make rules for the pipeline. With `stamp_dir`, each step also depends on a file holding its
    command line, rewritten only when it changes: editing one step's settings in the TOML reruns that
    step and what follows it, nothing before it."""
    name = spec["name"]
    data = spec["data"]
    data_opts = ["--data", data["spec"]] + (["--data-root", data["root"]] if data.get("root") else []) + \
        (["--limit", str(int(data["limit"]))] if data.get("limit") else []) + \
        (["--image-size", str(int(data["image_size"]))] if data.get("image_size") else []) + \
        (["--resize", data["resize"]] if data.get("resize") else [])
    data_file = [data["spec"].removeprefix("npz:")] if data.get("prepare") else []
    given_data = _data_file(data) if not data_file else None  # the user's npz or CSV file: changed, steps rerun
    data_file = data_file or ([given_data] if given_data else [])
    d = spec["dump"]
    runs_dir, cache_dir = f"runs/{name}", f"cache/{name}"
    q = shlex.join
    lines = [f"# Generated by `python -m kdpipe.pipeline` from the pipeline {name!r}: do not edit.", ""]
    stamps = {}

    def rule(targets: str, prereqs: list[str], command: str, key: str, unstamped: str = "",
             after: tuple[str, ...] = ()) -> list[str]:
        """`unstamped`: flags run with the command but left out of its stamp (not settings: a pipeline
        written before such a flag was added does not rerun the step for it). `after`: files made first,
        whose changes do not rerun the step (Make's order-only prerequisites)."""
        if stamp_dir is not None:
            stamp = f"{stamp_dir}/{key}.cmd"
            stamps[stamp] = command + "\n"
            prereqs = prereqs + [stamp]
        return [f"{targets}: {' '.join(prereqs)} | {' '.join(('$(SETUP)',) + after)}", f"\t{command}{unstamped}",
                ""]

    if data.get("prepare"):
        lines += rule(data_file[0], [], data["prepare"], "data")
    elif given_data:
        lines += _missing_file_rule(given_data, f"the [data] file {given_data}", "spec = \"...\"")
    # One teacher ([teacher]): runs/NAME/teacher.pt, cache/NAME. An ensemble ([[teacher]] entries): each entry's
    # teacher-<t>.pt and cache/NAME/<t>, every cache after the first dumped over the first's views (--like).
    ensemble = isinstance(spec["teacher"], list)
    teacher_files, caches = {}, {}
    for given in dict.fromkeys(t["file"] for t in _listify(spec["teacher"]) if "file" in t):
        lines += _missing_file_rule(given, f"the [teacher] file {given}", "file = \"...\"")
    for code in _code_files([t["arch"] for t in _listify(spec["teacher"]) if "arch" in t]
                            + [a for block in spec["students"] for a in _listify(block["archs"])]):
        lines += _missing_file_rule(code, f"the architecture file {code}", "arch or archs")
    for t in (spec["teacher"] if ensemble else [spec["teacher"]]):
        tname = t["name"] if ensemble else None
        suffix = f"-{tname}" if ensemble else ""  # of the teacher file and the steps' stamps
        teacher = t.get("file") or f"{runs_dir}/teacher{suffix}.pt"
        cache = f"{cache_dir}/{tname}" if ensemble else cache_dir
        first = next(iter(caches.values()), None)  # the primary cache, once dumped
        teacher_files[tname], caches[tname] = teacher, cache
        lines += _teacher_rules(rule, t, teacher, cache, first, data_opts, data_file, d, suffix)
    all_metrics = []
    for i, block in enumerate(spec["students"]):
        archs = _listify(block["archs"])
        temps = _listify(block.get("temperature", []))  # empty: the loss's default
        alphas = _listify(block.get("alpha", []))
        seeds = _listify(block.get("seed", [0]))
        loss, loss_options = parse_loss(block.get("loss", "kd"))
        training = {k: block[k] for k in _OPTIM_FLAGS if k in block and k != "lr"}
        for key in ("val_fraction", "val_split", "train_samples"):
            if key in block:
                training[key] = block[key]
        chosen = _listify(block.get("teachers", list(caches)))
        weights = _listify(block["teacher_weights"]) if "teacher_weights" in block else None
        out = f"{runs_dir}/students" + (f"/{'+'.join(chosen)}" if ensemble else "")
        arch_args = _arch_args(block, f"[[students]] #{i + 1}")  # checked before the run names use them
        targets = [f"{out}/{run}/metrics.json" for run, _, _ in plan_sweep(
            archs, temps, alphas, seeds, loss, loss_options, _listify(block.get("lr", [])), block["epochs"],
            block.get("batch_size", STUDENT_BATCH_SIZE), extra_tag=ensemble_tag(len(chosen), weights),
            arch_args=block.get("arch_args"), **training)]
        for target in targets:
            if target in all_metrics:
                raise KDPipeError(f"[[students]] #{i + 1} would train {target} again, as an earlier block does: "
                                  "drop the run from one of them")
        all_metrics += targets
        args = [x for n in chosen for x in ("--cache", caches[n])] + [x for a in archs for x in ("--student", a)] \
            + (["--teacher-weights", ",".join(str(w) for w in weights)] if weights else []) \
            + arch_args + _opts(block, {
            "epochs": "epochs", "loss": "loss", "temperature": "temperature", "alpha": "alpha", "seed": "seed",
            "batch_size": "batch-size", **_OPTIM_FLAGS, "val_fraction": "val-fraction",
            "val_split": "val-split", "device": "device",
            "train_samples": "train-samples", "checkpoint_every": "checkpoint-every",
            "keep_checkpoints": "keep-checkpoints", "hint_layer": "hint-layer", "hint_feature": "hint-feature"})
        # --overwrite: Make reruns this step when its settings or cache changed, and then its runs start over;
        # after a crash or Ctrl-C, the same settings resume (finished runs are skipped).
        lines += rule(" ".join(targets) + " &", [f"{caches[n]}/manifest.json" for n in chosen] + _code_files(archs),
                      f"$(KDPIPE) train-student {q(args)} --overwrite --out {out}", f"students-{i}")
    # A run's metrics.json is written last and atomically: one that exists is complete. Make must not delete
    # those a failed or interrupted train-student finished (.DELETE_ON_ERROR), or the rerun would retrain them.
    lines += [f".PRECIOUS: {' '.join(all_metrics)}", ""]
    report = f"{runs_dir}/report/report.md"
    lines += rule(report, all_metrics, f"$(KDPIPE) report {' '.join(str(Path(m).parent) for m in all_metrics)} "
                  f"--out {runs_dir}/report", "report")
    targets = [report]
    if "compress" in spec:
        c = spec["compress"]
        target = f"{runs_dir}/compress/compress.md"
        kinds = [x for key in ("quantize", "prune") if key in c for k in _listify(c[key]) for x in (f"--{key}", k)]
        teacher = teacher_files[None]  # [compress] needs one teacher (load_pipeline)
        t = spec["teacher"]  # a state dict (file with arch): compress reads it as dump-logits does
        weights = (["--teacher-arch", t["arch"]] + _arch_args(t, f"teacher {t['file']}") + _opts(t, {
            "mean": "mean", "std": "std", "input_range": "input-range", "normalize": "normalize"})
            if "file" in t and "arch" in t else [])
        lines += rule(target, [teacher] + all_metrics, f"$(KDPIPE) compress --teacher {teacher} {q(data_opts)} "
                      + q(weights + kinds + _opts(c, {"backend": "backend", "calibration": "calibration", "sparsity": "sparsity",
                                            "finetune_epochs": "finetune-epochs", "finetune_loss": "finetune-loss",
                                            "finetune_samples": "finetune-samples", "lr": "lr", "repeats": "repeats",
                                            "seed": "seed", "device": "device"}))
                      # the pipeline's runs, not whatever else runs/<name>/students holds (runs of settings since
                      # removed from the pipeline)
                      + "".join(f" --students {Path(m).parent}" for m in all_metrics)
                      + f" --out {runs_dir}/compress", "compress")
        targets.append(target)
    lines += [f"PIPELINE_TARGET := {' '.join(targets)}", ""]
    if stamp_dir is not None:
        for path, content in stamps.items():
            p = Path(path)
            if not p.is_file() or p.read_text() != content:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(content)
    return "\n".join(lines)


def _data_file(data: dict) -> str | None:
    """The file of an npz: or csv: spec, which the teacher and the dumps then depend on (a file edited in place
    reruns them), where Make can name it (no root to resolve it under, no character Make cannot take)."""
    kind, _, path = str(data["spec"]).partition(":")
    if kind not in ("npz", "csv") or not path or data.get("root") or not _MAKE_PATH.fullmatch(path):
        return None
    return path


def _code_files(archs: list[str]) -> list[str]:
    """The files of architectures given as PATH.py:NAME (the user's code, e.g. pipelines/food_nets.py), a
    prerequisite of the steps that build them where Make can name it: edited, those steps rerun (train-teacher and
    train-student record the file's sha256: merely touched, they keep their teacher and runs); before, make said
    "Nothing to be done" and the report showed students of the code as it was."""
    files = []
    for arch in archs:
        head, colon, _ = str(arch).strip().rpartition(":")
        if colon and head.endswith(".py") and _MAKE_PATH.fullmatch(head) and head not in files:
            files.append(head)
    return files


def _missing_file_rule(path: str, what: str, key: str) -> list[str]:
    """A rule for a file the pipeline is given: when it is missing, one line (Make alone says "No rule to make
    target")."""
    return [f"{path}:", "\t@echo " + shlex.quote(
        f"Error: $(PIPELINE): {what} does not exist (a path from the folder make runs in): put it there, or set "
        f"{key} to where it is") + " >&2; exit 1", ""]


def _teacher_rules(rule, t: dict, teacher: str, cache: str, first: str | None, data_opts: list[str],
                   data_file: list[str], d: dict, suffix: str) -> list[str]:
    """The rules of one teacher: train it (unless its file is given), dump its cache (over the views of the
    cache `first`, when given: an ensemble's later teachers)."""
    q = shlex.join
    lines = []
    if "file" not in t:
        lines += rule(teacher, data_file + _code_files([t["arch"]]), f"$(KDPIPE) train-teacher {q(data_opts)} " + q(
            ["--arch", t["arch"]] + _arch_args(t, f"teacher {t.get('name', t['arch'])}") + _opts(t, {
                "epochs": "epochs", "batch_size": "batch-size", **_OPTIM_FLAGS, "policy": "policy",
                "padding": "padding", "size": "size", "seed": "seed", "device": "device"})) + f" --out {teacher}",
            # Make retrains a teacher whose settings changed; how often it checkpoints is not one of them
            f"teacher{suffix}", unstamped=" " + q(_opts(t, {"checkpoint_every": "checkpoint-every"}) + ["--overwrite"]))
    loaded = []  # how a teacher file that kdpipe did not train is read
    if "file" in t:
        # a program teacher (TorchScript, ...) takes in_chans=3: arch_args went with arch only, and were dropped
        loaded = (["--teacher-arch", t["arch"]] if "arch" in t else []) + _arch_args(t, f"teacher {t['file']}")
        loaded += _opts(t, {
            "output": "teacher-output", "mean": "mean", "std": "std", "input_range": "input-range",
            "normalize": "normalize"}) + (["--trust-pickle"] if t.get("trust_pickle") else [])
    like = ["--like", first] if first else []  # dump-logits checks that the shared [dump] options agree with it
    # The primary cache is dumped first, but a new primary teacher does not re-dump the others: their views
    # are the [dump] options and the data, which their own stamps and prerequisites follow.
    code = _code_files([t["arch"]]) if "file" in t and "arch" in t else []  # a loaded teacher's own code
    lines += rule(f"{cache}/manifest.json", [teacher] + data_file + code,
                  f"$(KDPIPE) dump-logits --teacher {teacher} {q(data_opts)} " + q(loaded + like + _opts(d, {
                      "views": "views", "policy": "policy", "padding": "padding", "size": "size", "seed": "seed",
                      "logits_dtype": "logits-dtype", "batch_size": "batch-size", "shard_rows": "shard-rows",
                      "device": "device", "amp": "amp", "codec": "codec", "temperatures": "temperatures",
                      "features": "features"}) + (["--yes"] if d.get("yes") else [])
                      + (["--force"] if d.get("force") else [])) + f" --overwrite --out {cache}", f"dump{suffix}",
                  after=(f"{first}/manifest.json",) if first else ())
    return lines


def check_file_name(spec: dict, path) -> None:
    """Under make, a pipeline's name is its file's: the Makefile keeps its rules and stamps under build/<file
    name>/ and names runs/<file name>/report/ as its report. A name of its own (pipelines/mine.toml copied from
    default.toml, name = "default" kept) would retrain and overwrite another pipeline's teacher, cache and
    runs, and point at a report that is not there: refused."""
    stem = Path(path).stem
    if spec["name"] != stem:
        raise KDPipeError(f"{path}: name = {spec['name']!r} is not the file's name ({stem!r}): make would write "
                          f"runs/{spec['name']}/ and cache/{spec['name']}/, another pipeline's; set name = "
                          f"\"{stem}\" or delete the name line (or name the file {spec['name']}.toml)")


def claim_name(path, stamp_dir) -> None:
    """Under make, pipelines/mine.toml and exp/mine.toml are both the pipeline 'mine': one build/mine/, runs/mine/
    and cache/mine/. Each step runs --overwrite, so making the second retrained, re-dumped and overwrote the
    first's teacher, cache and students without a word, and making the first again overwrote the second's. The
    stamp folder records the file its pipeline was made from (build/<name>/source); another file of the same name
    is refused while that one exists. A file moved (the recorded one is gone) takes the name over."""
    import os
    # recorded relative to the project (the folder of build/, runs/ and cache/), as its outputs are: a project copied
    # with its build/ (cp -r proj proj2) owns its own files, not the original's (recorded absolute, they were refused)
    project = os.path.realpath(Path(stamp_dir).parent.parent)
    here_abs = os.path.realpath(path)
    here = os.path.relpath(here_abs, project)
    source = Path(stamp_dir) / "source"
    owner = source.read_text().strip() if source.is_file() else ""
    owner_abs = os.path.realpath(os.path.join(project, owner)) if owner else ""  # an absolute one stays as it is
    if owner and owner_abs != here_abs and os.path.isfile(owner_abs):
        name = Path(path).stem
        raise KDPipeError(f"{path}: runs/{name}/, cache/{name}/ and {stamp_dir}/ are the pipeline {owner_abs}'s, "
                          f"whose teacher, cache and students make would overwrite: name this file otherwise (e.g. "
                          f"{name}-2.toml), or delete {source} to hand them over")
    if owner != here:
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(here + "\n")


def check_prepared_file(spec: dict, path, stamp_dir) -> None:
    """Under make, refuse a pipeline whose [data] prepare writes the npz file that another pipeline of the project
    (one whose build/<name>/source names a file that exists) also prepares: each make of the one rewrote the file
    under the other, whose teacher and dump then reran on data its pipeline does not describe (or it kept a teacher
    trained on the other's data). With the same command, the first make of the one still reran it (its stamp was new)
    and rewrote the file, so the other's next make redid its dump and students. The other may read the file without a
    prepare of its own (a given file is a prerequisite: its steps rerun when the file changes)."""
    import os
    data = spec["data"]
    if not data.get("prepare"):
        return
    project = os.path.realpath(Path(stamp_dir).parent.parent)
    here = os.path.realpath(path)
    file = str(data["spec"]).removeprefix("npz:")
    mine = os.path.realpath(os.path.join(project, file))
    for source in sorted(Path(project, "build").glob("*/source")):
        other = os.path.realpath(os.path.join(project, source.read_text().strip()))
        if other == here or not os.path.isfile(other):
            continue
        try:
            theirs = load_pipeline(other)["data"]
        except KDPipeError:  # its own make says what is wrong with it
            continue
        if theirs.get("prepare") and os.path.realpath(
                os.path.join(project, str(theirs["spec"]).removeprefix("npz:"))) == mine:
            shown = os.path.relpath(other, project)
            if theirs["prepare"].strip() == data["prepare"].strip():  # one data, but the file would be written again
                raise KDPipeError(f"{path}: [data] prepare writes {file}, which the pipeline {shown} prepares too, "
                                  "with the same command: making this one would run it again (its step is new here) "
                                  f"and rewrite the file, and the next make of {shown} would then redo its dump and "
                                  f"students; delete this prepare line, and this pipeline reads the file {shown} "
                                  "writes")
            raise KDPipeError(f"{path}: [data] prepare writes {file}, which the pipeline {shown} prepares too: each "
                              "make of one would rewrite it under the other, whose teacher would then train on data "
                              "its pipeline does not describe; give this spec another file and have the prepare "
                              "command write that one (changed in the spec alone, the command still writes "
                              f"{file}), or "
                              f"delete this prepare line and read the file {shown} writes")


if __name__ == "__main__":  # `python -m kdpipe.pipeline SPEC.toml`: needs only the standard library
    import sys
    try:
        spec = load_pipeline(sys.argv[1])
        check_file_name(spec, sys.argv[1])
        if len(sys.argv) > 2:
            check_prepared_file(spec, sys.argv[1], sys.argv[2])  # before claim_name records this file as a pipeline
            claim_name(sys.argv[1], sys.argv[2])
        sys.stdout.write(make_rules(spec, sys.argv[2] if len(sys.argv) > 2 else None))
    except (KDPipeError, IndexError) as e:
        sys.exit(f"Error: {e or 'usage: python -m kdpipe.pipeline PIPELINE.toml [STAMP_DIR]'}")
