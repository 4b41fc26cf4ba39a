"""The kdpipe command line: thin click commands over the library."""

from __future__ import annotations

import json
import signal
import sys
import time

import click

from kdpipe import KDPipeError, __version__


class InputError(click.ClickException):
    """One line on stderr ("Error: ..."), exit code 2, no traceback."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDPipeError as e:
            raise InputError(str(e)) from None
        except click.UsageError as e:  # click's own parse errors: one line too, with where to look
            name = e.ctx.command_path if e.ctx is not None else ctx.command_path
            raise InputError(f"{e.format_message()} (see '{name} --help')") from None


class NumberList(click.ParamType):
    """A comma-separated list of numbers ("1,4,8"); the option may also be repeated."""

    name = "LIST"

    def __init__(self, kind=float):
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return [self.kind(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s", param, ctx)


def _flatten(values):
    return [v for vs in values for v in vs]


def data_options(f):
    f = click.option("--image-size", type=click.IntRange(min=1), default=None, metavar="S",
                     help="Store an ImageFolder's images at S x S: the shorter side resized to S (antialiased "
                          "bicubic), then centre-cropped. Needed when its images differ in size; recorded "
                          "in the cache, so stage two reloads the data the same way.")(f)
    f = click.option("--data-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="Folder holding the dataset's files (default: the source's usual location).")(f)
    f = click.option("--data", "data_spec", default="fashion-mnist", show_default=True, metavar="SPEC",
                     help="Dataset: fashion-mnist, mnist, cifar10, cifar100, imagefolder:PATH or npz:PATH.")(f)
    return f


def device_option(f):
    return click.option("--device", default="auto", show_default=True, metavar="DEVICE",
                        help="auto (CUDA when present), cpu, cuda or cuda:N.")(f)


class LazyHelpOption(click.Option):
    """An option whose help text is computed when --help asks for it: the view ops and the losses come from
    their registries (so a new member needs no edit here), without importing torch for every command."""

    def __init__(self, *args, help_text, **kwargs):
        super().__init__(*args, **kwargs)
        self.help_text = help_text

    def get_help_record(self, ctx):
        self.help = self.help_text()
        return super().get_help_record(ctx)


def policy_help() -> str:
    from kdpipe.views import spec_help
    return (f"Views: {spec_help()}. E.g. crop:4+flip, crop:2, rotate:15+flip, pad-crop:256:symmetric, "
            "resized-crop:224+flip.")


def loss_help() -> str:
    from kdpipe.losses import known_losses
    return ("Distillation loss and its options other than T and alpha, e.g. dkd:beta=8,warmup=20. Losses "
            f"(options=defaults): {known_losses()}.")


def policy_options(f):
    f = click.option("--size", type=click.IntRange(min=1), default=None, metavar="PIXELS",
                     help="Output size of the resized-crop-flip alias (default: the image height).")(f)
    f = click.option("--padding", type=click.IntRange(min=0), default=4, show_default=True, metavar="PIXELS",
                     help="Zero padding of the crop-flip alias.")(f)
    f = click.option("--policy", cls=LazyHelpOption, default="crop-flip", show_default=True, metavar="SPEC",
                     help_text=policy_help)(f)
    return f


def optim_options(f):
    f = click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine",
                     show_default=True, help="Learning-rate schedule over all steps (step: x0.1 at 50% and 75%).")(f)
    f = click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True,
                     metavar="WD", help="SGD weight decay (not applied to biases and norms).")(f)
    f = click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, metavar="M",
                     help="SGD momentum.")(f)
    f = click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
                     metavar="LR", help="Peak learning rate of SGD.")(f)
    return f


def _amp(device, amp):
    return (device.type == "cuda") if amp is None else amp


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdpipe")
def main():
    """kdpipe: cache a teacher's logits once (stage one), train many students from them (stage two)."""
    from kdpipe.util import env_threads
    env_threads()


@main.command("train-teacher")
@data_options
@click.option("--arch", required=True, metavar="NAME", help="Teacher architecture (registry or torchvision name).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, metavar="N",
              help="Training epochs.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.pt",
              help="Where to save the teacher checkpoint.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, metavar="B",
              help="Training batch size.")
@policy_options
@optim_options
@click.option("--seed", type=int, default=0, show_default=True, metavar="S", help="Seed of init, order and views.")
@device_option
@click.option("--amp/--no-amp", default=None, help="bf16 autocast (default: on with CUDA, off on CPU).")
def train_teacher_cmd(data_spec, data_root, image_size, arch, epochs, out, batch_size, policy, padding, size, lr, momentum,
                      weight_decay, schedule, seed, device, amp):
    """Train a teacher and save a checkpoint that records its architecture, classes, input
    normalization and size, the dataset fingerprint and its test accuracy."""
    from kdpipe.data import load_dataset
    from kdpipe.engine import OptimConfig
    from kdpipe.models import create_model
    from kdpipe.teacher import train_teacher
    from kdpipe.util import pick_device
    from kdpipe.views import create_policy

    dev = pick_device(device)
    train = load_dataset(data_spec, "train", data_root, image_size)
    test = load_dataset(data_spec, "test", data_root, image_size)
    pol = create_policy(policy, padding=padding, size=size)
    create_model(arch, train.num_classes, pol.output_shape(train.image_shape))
    res = train_teacher(train, test, arch, epochs, out, policy=pol, batch_size=batch_size,
                        optim=OptimConfig(lr, momentum, weight_decay, schedule), seed=seed, device=dev,
                        amp=_amp(dev, amp), log=click.echo)
    click.echo(f"teacher saved to {res['path']} (test top-1 {res['test_top1']:.4f})")


@main.command("dump-logits")
@click.option("--teacher", "teacher_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Teacher: a kdpipe checkpoint or a TorchScript file.")
@click.option("--teacher-arch", default=None, metavar="NAME",
              help="Teacher architecture (registry or torchvision name), with --teacher-weights.")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="State dict for --teacher-arch.")
@data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which split to dump.")
@click.option("--views", type=int, default=None, metavar="K",
              help="Views per sample; set it to the students' planned epochs.  [required]")
@policy_options
@click.option("--seed", type=int, default=0, show_default=True, metavar="S", help="Seed of the view parameters.")
@click.option("--logits-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="How raw logits are stored.")
@click.option("--batch-size", type=int, default=512, show_default=True, metavar="B", help="Teacher batch size.")
@click.option("--shard-rows", type=int, default=65536, show_default=True, metavar="ROWS",
              help="Rows per HDF5 shard (the unit of resumption).")
@device_option
@click.option("--amp/--no-amp", default=False, show_default=True, help="Run the teacher under bf16 autocast.")
@click.option("--overwrite", is_flag=True, help="Start over if OUT holds a cache made with other arguments (with the same arguments a dump resumes).")
@click.option("--out", required=True, type=click.Path(), metavar="CACHE_DIR", help="Cache directory to write.")
def dump_logits_cmd(teacher_file, teacher_arch, teacher_weights, data_spec, data_root, image_size, split, views, policy,
                    padding, size, seed, logits_dtype, batch_size, shard_rows, device, amp, overwrite, out):
    """Stage one: run the teacher once over K views of every sample and write the logits cache."""
    from kdpipe.checkpoint import load_teacher
    from kdpipe.data import load_dataset
    from kdpipe.distributed import from_env
    from kdpipe.teacher import dump_logits
    from kdpipe.util import pick_device
    from kdpipe.views import create_policy

    if views is None:
        raise click.UsageError("--views K is required (views per sample; the students' planned epochs)")
    if views <= 0:
        raise InputError(f"--views must be >= 1, got {views}")
    if batch_size <= 0:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_rows <= 0:
        raise InputError(f"--shard-rows must be >= 1, got {shard_rows}")
    if teacher_file is None and not (teacher_arch and teacher_weights):
        raise InputError("give a teacher: --teacher FILE, or --teacher-arch NAME with --teacher-weights FILE")
    _term_as_interrupt()  # first: an interruption at any moment gets the message below, not a traceback
    started = time.perf_counter()
    try:
        dev = pick_device(device)
        data = load_dataset(data_spec, split, data_root, image_size)
        test = load_dataset(data_spec, "test", data_root, image_size) if split == "train" else None
        pol = create_policy(policy, padding=padding, size=size)
        teacher = load_teacher(teacher_file, arch=teacher_arch, weights=teacher_weights,
                               image_shape=pol.output_shape(data.image_shape), num_classes=data.num_classes)
        dist = from_env(dev)  # torchrun: join the process group; else one process
        log = dist.log(click.echo)
        log(f"dumping {teacher.arch} logits: {data.spec} {split} ({len(data)} samples) x {views} views "
            f"({pol.spec}) -> {out} on {dist.device}" + (f" x {dist.world} ranks" if dist.world > 1 else ""))
        res = dump_logits(teacher, data, test, out, policy=pol, views=views, seed=seed,
                          logits_dtype=logits_dtype, batch_size=batch_size, shard_rows=shard_rows,
                          device=dist.device, amp=amp, overwrite=overwrite, dist=dist, log=log)
        dist.close()
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: complete shards are kept in {out}; run the same command again to resume",
                   err=True)
        sys.exit(130)
    if not dist.is_main:
        return
    click.echo(f"done: {res['rows']:,} rows, {res['bytes'] / 1e6:.2f} MB on disk in {out}, "
               f"{time.perf_counter() - started:.1f}s wall time in all")
    if not res.get("already_complete"):
        rate = res.get("rows_per_s")
        click.echo(f"  computed {res['rows_computed']:,} rows in {res['compute_wall_s']:.1f}s"
                   + (f" ({rate:,.0f} images/s)" if rate else "") +
                   (f", {res['resumed_shards']} shard(s) kept from an earlier run" if res["resumed_shards"] else ""))
    click.echo(f"  teacher top-1 on its views {res['views_top1']:.4f}"
               + (f", on the clean test split {res['test_top1']:.4f}" if res.get("test_top1") is not None else ""))


def _term_as_interrupt():
    """SIGTERM stops a dump like Ctrl-C: complete shards are kept, a message says how to resume."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass


@main.command("train-student")
@click.option("--cache", "cache_dir", required=True, type=click.Path(), metavar="CACHE_DIR",
              help="Cache written by dump-logits.")
@click.option("--student", "students", multiple=True, required=True, metavar="NAME",
              help="Student architecture; repeat for several.")
@click.option("--epochs", type=int, default=10, show_default=True, metavar="N", help="Training epochs.")
@click.option("--loss", "loss", cls=LazyHelpOption, default="kd", show_default=True, metavar="NAME[:OPT=V,...]",
              help_text=loss_help)
@click.option("--temperature", "temperatures", type=NumberList(float), multiple=True, metavar="T[,T...]",
              help="The loss's temperature(s).  [default: the loss's, 4]")
@click.option("--alpha", "alphas", type=NumberList(float), multiple=True, metavar="A[,A...]",
              help="The loss's alpha(s): kd's weight of the KD term (0 trains from scratch), dkd's weight of "
                   "TCKD.  [default: the loss's, kd 0.9, dkd 1]")
@click.option("--seed", "seeds", type=NumberList(int), multiple=True, metavar="S[,S...]",
              help="Seed(s) of init and data order.  [default: 0]")
@click.option("--batch-size", type=int, default=128, show_default=True, metavar="B",
              help="Training batch size; under torchrun per rank (the effective batch is B x world size).")
@optim_options
@click.option("--data-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where the cache's dataset lies now, if it moved.")
@device_option
@click.option("--amp/--no-amp", default=None, help="bf16 autocast (default: on with CUDA, off on CPU).")
@click.option("--fuse", type=click.Choice(["auto", "compile", "on", "off"]), default="auto", show_default=True,
              help="Step the runs of one architecture in a pass as one vmapped network: 'compile' under "
                   "torch.compile, 'on' without compiling, 'off' one run after another; 'auto' compiles the "
                   "fused runs on CUDA for passes of at least 1500 steps and groups of at least 4 runs, and steps "
                   "runs one by one otherwise "
                   "(what was measured fastest; see BENCHMARKS.md).")
@click.option("--train-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train every run on the same N of the cache's samples (a fixed subset) with their cached "
                   "views: scarce labels, where the teacher's soft targets regularize.  [default: all]")
@click.option("--out", required=True, type=click.Path(), metavar="RUNS_DIR",
              help="Each run writes RUNS_DIR/<run-name>/.")
def train_student_cmd(cache_dir, students, epochs, loss, temperatures, alphas, seeds, batch_size, lr, momentum,
                      weight_decay, schedule, data_root, device, amp, fuse, train_samples, out):
    """Stage two: train students from cached logits. Lists make a sweep (the cartesian product of
    students, temperatures, alphas and seeds) for one --loss; runs with the same seed share one pass over the
    data. Each run's metrics.json holds the per-epoch mean of every term of its loss."""
    from kdpipe.distributed import from_env
    from kdpipe.engine import OptimConfig
    from kdpipe.student import train_students
    from kdpipe.util import pick_device

    temps = _flatten(temperatures)  # empty: the loss's default
    alphs = _flatten(alphas)
    sds = _flatten(seeds) or [0]
    if epochs <= 0:
        raise InputError(f"--epochs must be >= 1, got {epochs}")
    if batch_size <= 0:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    dev = pick_device(device)
    dist = from_env(dev)  # torchrun: DistributedDataParallel, --batch-size per rank; else one process
    res = train_students(cache_dir, list(students), epochs, out, loss=loss, temperatures=temps, alphas=alphs, seeds=sds,
                         batch_size=batch_size, optim=OptimConfig(lr, momentum, weight_decay, schedule),
                         device=dist.device, data_root=data_root, amp=_amp(dev, amp), dist=dist,
                         log=dist.log(click.echo),
                         fuse={"auto": None, "compile": "compile", "on": True, "off": False}[fuse],
                         train_samples=train_samples)
    dist.close()
    if dist.is_main:
        click.echo(f"{len(res)} run(s) written under {out}")


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@click.option("--out", required=True, type=click.Path(), metavar="DIR", help="Where to write report.md and plots.")
def report_cmd(run_dirs, out):
    """Write a markdown table (teacher and every student) and PNG plots from run directories."""
    from kdpipe.report import build_report
    res = build_report(run_dirs, out)
    click.echo(f"report of {res['runs']} run(s): {res['report']}")
    for p in res["plots"]:
        click.echo(f"  plot: {p}")


@main.command("inspect")
@click.argument("cache_dir", type=click.Path(), metavar="CACHE_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect_cmd(cache_dir, as_json):
    """Print what a cache holds: teacher, data, views, classes, codec, rows, bytes, creation."""
    from kdpipe.cache.reader import Cache, open_h5
    c = Cache(cache_dir)
    m = c.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    t, d, v = m["teacher"], m["dataset"], m["views"]
    click.echo(f"cache {c.path}  (format {m['format_version']}, id {m['cache_id'][:12]}, created {m['created']}, "
               f"kdpipe {m['kdpipe_version']}, torch {m['torch_version']})")
    click.echo(f"  teacher   {t['arch']} ({t['kind']}, {t.get('parameters', 0):,} parameters, sha256 "
               f"{t['fingerprint'][:12]}), test top-1 {t.get('test_top1')}")
    click.echo(f"  data      {d['spec']} {d['split']}: {d['num_samples']:,} samples of {tuple(d['image_shape'])}, "
               f"{m['num_classes']} classes, sha256 {d['fingerprint'][:12]}")
    if "ops" in v:  # a composition of view ops, each with its version
        ops = f"{v['spec']} (" + ", ".join(f"{o['name']} v{o['version']}" for o in v["ops"]) + ")"
    else:  # a named policy of a version 1 cache
        ops = f"{v['policy']} v{v['policy_version']} (" + (", ".join(
            f"{k}={val}" for k, val in v.get("options", {}).items()) or "no options") + ")"
    click.echo(f"  views     K={v['K']} policy {ops}, "
               f"seed {v['seed']}, params {', '.join(v['columns']) or '-'}")
    click.echo(f"  logits    codec {m['logits']['codec']}, {m['logits']['dtype']}, rows {m['rows']:,} "
               f"({m['row_order']}), input {tuple(m['input']['shape'])}")
    on_disk = sum((c.path / s["file"]).stat().st_size for s in m["shards"] if (c.path / s["file"]).is_file())
    click.echo(f"  shards    {len(m['shards'])}, {on_disk / 1e6:.2f} MB on disk ({m['bytes'] / 1e6:.2f} MB "
               "with eval), bytes per view row "
               f"{on_disk / max(1, m['rows']):.1f}")
    if m["shards"]:
        rows = m["shards"][0]["row_stop"] - m["shards"][0]["row_start"]
        with open_h5(c.shard_path(0)) as f:
            names = ", ".join(f"{col.path} {f[col.path].dtype.str}{list(f[col.path].shape)}" if col.path in f
                              else f"{col.path} MISSING (declared {col.np_dtype(m).str}{list(col.full_shape(m, rows))})"
                              for col in c.shard_columns.values())
        click.echo(f"  columns   {names} (first shard)")
    dump = m.get("dump", {})
    if dump.get("rows_per_s"):
        amp = dump.get("autocast_dtype") or ("bfloat16" if dump.get("amp") else None)
        click.echo(f"  dump      {dump['rows_per_s']:,.0f} images/s on {dump['device']}"
                   + (f" under {amp} autocast" if amp else "") + f", teacher top-1 on views {dump['views_top1']:.4f}")


@main.command("verify-cache")
@click.argument("cache_dir", type=click.Path(), metavar="CACHE_DIR")
@click.option("--teacher", "teacher_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Re-run this teacher on sampled (view, sample) pairs and compare with the stored logits.")
@click.option("--teacher-arch", default=None, metavar="NAME", help="Teacher architecture, with --teacher-weights.")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="State dict for --teacher-arch.")
@click.option("--sample", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="How many random rows the teacher re-computes.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where the cache's dataset lies now, if it moved.")
@click.option("--seed", type=int, default=0, show_default=True, metavar="S", help="Seed of the row sample.")
@device_option
def verify_cache_cmd(cache_dir, teacher_file, teacher_arch, teacher_weights, sample, data_root, seed, device):
    """Check every shard's checksums and shapes; with a teacher, re-compute sampled rows. Exits 1 on a
    fault, naming the shard and rows."""
    from kdpipe.util import pick_device
    from kdpipe.verify import repair_hint, verify_cache
    faults = verify_cache(cache_dir, teacher_file=teacher_file, teacher_arch=teacher_arch,
                          teacher_weights=teacher_weights, sample=sample, data_root=data_root, seed=seed,
                          device=pick_device(device), log=click.echo)
    if faults:
        for f in faults:
            click.echo(f"FAULT {f}", err=True)
        click.echo(f"{len(faults)} fault(s) in {cache_dir}; {repair_hint(cache_dir)}", err=True)
        sys.exit(1)
    click.echo(f"{cache_dir}: OK")


@main.command("make-rules")
@click.argument("pipeline", type=click.Path(dir_okay=False), metavar="PIPELINE.toml")
@click.option("--stamps", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also write each step's command line to DIR/<step>.cmd (rewritten only when it changes), "
                   "so that editing one step reruns that step and what follows.")
def make_rules_cmd(pipeline, stamps):
    """Print Make rules (real file targets) for a pipeline spec; the Makefile includes them."""
    from kdpipe.pipeline import load_pipeline, make_rules
    click.echo(make_rules(load_pipeline(pipeline), stamps), nl=False)


if __name__ == "__main__":
    main()
