"""The kdpipe command line: thin click commands over the library."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import click

from kdpipe import KDPipeError, __version__
from kdpipe.sweep import STUDENT_BATCH_SIZE


class InputError(click.ClickException):
    """One line on stderr ("Error: ..."), exit code 2, no traceback."""

    exit_code = 2


class OutOfMemory(click.ClickException):
    """Memory ran out (a model or batch too large for the machine): one line, exit code 1."""

    exit_code = 1


def out_of_memory_line(e: BaseException) -> str | None:
    """The one line for an allocation that failed (CPU or CUDA), or None where e is not one."""
    import torch
    from kdpipe.util import error_line
    text = str(e)
    if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    cpu = re.search(r"tried to allocate (\d+) bytes", text)
    gpu = re.search(r"Tried to allocate ([\d.]+ \w+)\. GPU (\d+) has a total capacity of ([\d.]+ \w+) of which "
                    r"([\d.]+ \w+) is free", text)
    if cpu:
        what = f"an allocation of {int(cpu.group(1)) / 2**30:,.1f} GiB failed"
    elif gpu:
        what = f"an allocation of {gpu[1]} on GPU {gpu[2]} failed ({gpu[4]} free of {gpu[3]})"
    else:
        what = error_line(e)
    return (f"out of memory: {what}; use a smaller --batch-size or a smaller model (or a machine with more "
            "memory)")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return self._invoke(ctx)
        except click.ClickException as e:
            _exit_joined(e)
            raise

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDPipeError as e:
            raise InputError(str(e)) from None
        except click.UsageError as e:  # click's own parse errors: one line too, with where to look
            name = e.ctx.command_path if e.ctx is not None else ctx.command_path
            raise InputError(f"{e.format_message()} (see '{name} --help')") from None
        except (MemoryError, RuntimeError) as e:
            line = out_of_memory_line(e)
            if line is None:
                line = _peer_lost_line(e)
                if line is None:
                    raise
                raise PeerLost(line) from None
            raise OutOfMemory(line) from None


class PeerLost(click.ClickException):
    """Under torchrun, another rank's process ended (killed, crashed) while this one waited on it: one line, exit 1."""

    exit_code = 1


# What the gloo and NCCL collectives raise when a peer's process is gone or silent (its sockets closed or reset,
# the collective's timeout, a communicator aborted).
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Read error|Timed out waiting|timed out after|"
                        r"Socket Timeout|NCCL communicator was aborted|remote process exited", re.IGNORECASE)


def _peer_lost_line(e: BaseException) -> str | None:
    """The one line for a collective that failed because another rank of a joined torchrun group went away (its
    traceback, from inside DDP's backward or a broadcast, was all a surviving rank printed), else None."""
    td = sys.modules.get("torch.distributed")
    if td is None or not td.is_available() or not td.is_initialized() or not _PEER_LOST.search(str(e)):
        return None
    what = _PEER_LOST.search(str(e)).group(0)
    if "time" in what.lower():
        from kdpipe.distributed import timeout
        what += f" after KDPIPE_DIST_TIMEOUT={timeout().total_seconds():g} s"
    return (f"another rank of this torchrun job stopped or stopped answering ({what}): torchrun's report names it "
            "and why; what was finished is kept, run the same command again to resume")


def _exit_joined(e: click.ClickException) -> None:
    """Under torchrun, a process that joined the process group and fails with its one line ends at once after
    printing it (os._exit), as a successful one does (_end_distributed): the interpreter's teardown of the gloo
    group aborted it now and then ('terminate called without an active exception', exit -6 instead of 2), so
    torchrun named a SIGABRT as the failure. Outside a joined group, nothing (click prints and exits)."""
    td = sys.modules.get("torch.distributed")
    if td is None or not td.is_available() or not td.is_initialized():
        return
    e.show()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.exit_code)


class OutPath(click.Path):
    """--out: a path, not an empty string (which wrote into the current folder, "1 run(s) written under "), with
    ~ expanded (the shell leaves --out=~/x as it is: a folder named '~' was written in the current one)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty: give the path to write to", param, ctx)
        if isinstance(value, str):
            value = os.path.expanduser(value)
        return super().convert(value, param, ctx)


class NumberList(click.ParamType):
    """A comma-separated list of numbers ("1,4,8"); the option may also be repeated."""

    name = "LIST"

    def __init__(self, kind=float, top: int | None = None, hint: str = ""):
        self.kind, self.top = kind, top  # top: the largest value (with kind int, values from 0: seeds)
        self.hint = hint  # said after a value that is no list of numbers

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            values = [self.kind(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s{self.hint}", param, ctx)
        if not values:  # "--temperature ," trained at the loss's default without a word
            self.fail(f"{value!r} holds no number", param, ctx)
        if self.top is not None and not all(0 <= v <= self.top for v in values):
            self.fail(f"{value!r}: each must lie in 0..{self.top}", param, ctx)
        return values


class FloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN, which fails no comparison, so click lets it through (where the library
    checks no value for NaN: --checkpoint-every nan never checkpointed within an epoch, without a word)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if math.isnan(v):
            self.fail(f"{value!r} is not a number", param, ctx)
        return v


SEED_MAX = 2 ** 32 - 1  # torch and numpy take larger seeds, but not every larger one (an int64 overflows)
SEED = click.IntRange(0, SEED_MAX)


def _flatten(values):
    return [v for vs in values for v in vs]


def data_options(f):
    f = click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Use only N samples of each split, drawn from a fixed seed, so a folder sorted by class "
                          "keeps every class (quick end-to-end checks); recorded in the cache, so stage two "
                          "takes the same samples.")(f)
    f = click.option("--image-size", type=click.IntRange(min=1), default=None, metavar="S",
                     help="Store image files (imagefolder:, files:, csv:) at S x S: the shorter side resized to "
                          "S (antialiased bicubic), then centre-cropped (other ways: --resize). Needed when its "
                          "images differ in size; recorded in the cache, so stage two reloads the data the same "
                          "way.")(f)
    f = click.option("--resize", default=None, metavar="MODE",
                     help="With --image-size S, how photos become S x S: crop (default) resizes the shorter side "
                          "to S and takes the centre; crop:R resizes it to R >= S first; squash resizes the whole "
                          "photo to S x S, not keeping its aspect ratio. PIL bicubic, or bilinear with :bilinear, "
                          "torchvision's default: crop:256:bilinear with S 224 stores exactly what torchvision's "
                          "Resize(256) + CenterCrop(224) give, squash:bilinear what Resize((S, S)) gives. Give the "
                          "resize the teacher was evaluated with. Recorded in the cache, as --image-size.")(f)
    f = click.option("--data-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="Folder holding the dataset's files (default: the source's usual location).")(f)
    f = click.option("--data", "data_spec", cls=LazyHelpOption, default="fashion-mnist", show_default=True,
                     metavar="SPEC", help_text=data_help)(f)
    return f


def data_help() -> str:
    from kdpipe.data import sources_usage
    return (f"Dataset: {sources_usage()}. files: is flat folders of <label>_<n>.jpg; csv: has columns label, "
            "split, and path or numeric features (see the README's Bring your own data).")


def moved_data_options(f):
    """Where a cache's dataset lies now (train-student, verify-cache), if it moved since the dump."""
    f = click.option("--data", "data_spec", default=None, metavar="SPEC",
                     help="The cache's dataset at its new location, e.g. npz:/new/place/data.npz (default: "
                          "the spec the cache records). Its fingerprint must match the cache's.")(f)
    f = click.option("--data-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="Where the cache's dataset lies now, if it moved: the folder holding the file or "
                          "folder of imagefolder:, files:, csv: and npz: (or that folder itself), or the "
                          "folder of the other sources' files.")(f)
    return f


ARCH_SPEC_HELP = ("registry name (kdpipe:NAME or bare), torchvision (tv:NAME or bare), timm:NAME, or your own "
                  "code: path/to/nets.py:Factory or package.module:Factory")


def arch_args_option(f):
    return click.option("--arch-args", default=None, metavar="K=V,...",
                        help="Keyword arguments of the architecture's factory, e.g. width=16,depth=4 (numbers, "
                             "true/false, none, else strings); recorded in the checkpoint.")(f)


def teacher_options(f):
    """How a teacher file is read (dump-logits and verify-cache alike)."""
    f = click.option("--teacher-output", default=None, metavar="NAME|INDEX",
                     help="Which entry of the teacher's output holds the logits (default: a tensor as is, a "
                          "tuple's or list's first entry, a dict's 'logits' or 'out', an object's .logits).")(f)
    f = click.option("--trust-pickle", is_flag=True,
                     help="Load a whole pickled model (torch.save(model)); this runs code from the file.")(f)
    f = arch_args_option(f)
    f = click.option("--teacher-weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Same as --teacher FILE, for a state dict with --teacher-arch.")(f)
    f = click.option("--teacher-arch", default=None, metavar="SPEC",
                     help="Architecture that a state-dict or safetensors teacher file fills: " + ARCH_SPEC_HELP + ".")(f)
    f = click.option("--teacher", "teacher_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Teacher: a kdpipe checkpoint, TorchScript, torch.export (.pt2), or a state dict "
                          "(.pt/.pth/.bin) or .safetensors file with --teacher-arch.")(f)
    return f


def normalization_options(f):
    from kdpipe.normalization import PRESETS, RANGES  # no torch import: the presets are plain numbers
    f = click.option("--normalize", "normalize", type=click.Choice(sorted(PRESETS)), default=None,
                     help="Input normalization preset (mean and std of pixels in [0, 1]), e.g. imagenet for "
                          "pretrained torchvision/timm weights.")(f)
    f = click.option("--input-range", type=click.Choice(list(RANGES)), default=None,
                     help="For a teacher that normalizes inside: feed pixels in [0, 1] or raw 0-255.")(f)
    f = click.option("--std", type=NumberList(float), default=None, metavar="S[,S...]",
                     help="Per-channel std of the teacher's input normalization (with --mean).")(f)
    f = click.option("--mean", type=NumberList(float), default=None, metavar="M[,M...]",
                     help="Per-channel mean of pixels in [0, 1] the teacher was trained with (with --std). A kdpipe "
                          "checkpoint carries its own; any other teacher needs --mean/--std, --input-range or "
                          "--normalize. Grey images fed to an RGB teacher (repeated to 3 channels) also take 3 "
                          "values: Grayscale(3) + Normalize.")(f)
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
            f"resized-crop:224+flip.  [default: {DEFAULT_POLICY} for images, none for feature vectors]")


def loss_help() -> str:
    from kdpipe.losses import known_losses
    return ("Distillation loss and its options other than T and alpha, e.g. dkd:beta=8,warmup=20, or a weighted "
            "composition, kd+hint or kd:1,hint:50 (a hint term needs --hint-layer and a cache dumped with "
            f"--features). Losses (options=defaults): {known_losses()}.")


def policy_options(f):
    f = click.option("--size", type=click.IntRange(min=1), default=None, metavar="PIXELS",
                     help="Output size of the resized-crop-flip alias (default: the image height); other specs "
                          "carry their own, e.g. resized-crop:224+flip.")(f)
    f = click.option("--padding", type=click.IntRange(min=0), default=4, show_default=True, metavar="PIXELS",
                     help="Zero padding of the crop-flip alias; other specs carry their own, e.g. crop:2+flip.")(f)
    f = click.option("--policy", cls=LazyHelpOption, default=None, metavar="SPEC", help_text=policy_help)(f)
    return f


DEFAULT_POLICY = "crop-flip"  # for images; feature vectors, which no image op fits, get their clean view (none)


def view_policy(policy: str | None, data, padding: int, size: int | None):
    """--policy, or its default for the data: crop-flip for images, none for feature vectors."""
    from kdpipe.views import create_policy
    if policy is None:
        policy = "none" if len(data.image_shape) == 1 else DEFAULT_POLICY
        ctx = click.get_current_context()
        given = " and ".join(f"--{n}" for n in ("padding", "size")
                             if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT)
        if policy == "none" and given:  # options of crop-flip, the images' default, which would be ignored
            raise InputError(f"{given} {'are options' if ' and ' in given else 'is an option'} of crop-flip, the "
                             f"default views of images; {data.spec} holds feature vectors, whose default views are "
                             f"none: leave {given} out, or give --policy")
    return create_policy(policy, padding=padding, size=size)


def check_teacher_once(teacher_file, teacher_weights) -> None:
    if teacher_file is not None and teacher_weights is not None:
        raise InputError("give the teacher file once: --teacher FILE or --teacher-weights FILE, not both")


def check_policy_options(policy: str, padding: int, size: int | None) -> None:
    """--padding and --size, given explicitly, with a --policy that would ignore them (kdpipe.views)."""
    from kdpipe.sweep import check_alias_options
    ctx = click.get_current_context()
    given = {name: value for name, value in (("padding", padding), ("size", size))
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    if policy is None and "size" in given:  # no default uses it: not crop-flip (images), not none (feature vectors)
        raise InputError(f"--size {size} sets the size of the resized-crop-flip alias, which the default views (crop-flip "
                         f"for images, none for feature vectors) do not use: give --policy resized-crop-flip, or "
                         f"write it in the spec (--policy resized-crop:{size}+flip) and leave --size out")
    check_alias_options(policy or DEFAULT_POLICY, given)


def optim_options(lr_list: bool):
    """The optimizer and schedule options; with lr_list, --lr takes a list (a sweep axis)."""
    def add(f):
        f = click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True,
                         metavar="E", help="Linear warm-up from ~0 to the peak lr over the first E epochs; the "
                                           "schedule runs over the rest (not with onecycle, which has its own).")(f)
        f = click.option("--schedule", type=click.Choice(["cosine", "step", "constant", "onecycle"]),
                         default="cosine", show_default=True,
                         help="Learning-rate schedule over all steps (step: x0.1 at 50% and 75%; onecycle: as "
                              "torch's OneCycleLR, lr only: up from lr/25 over 30% of the steps, cosine down to "
                              "lr/25e4).")(f)
        f = click.option("--eps", type=click.FloatRange(min=0, min_open=True), default=1e-8, show_default=True,
                         metavar="EPS", help="Adam/AdamW epsilon.")(f)
        f = click.option("--betas", type=NumberList(float), default="0.9,0.999", show_default=True,
                         metavar="B1,B2", help="Adam/AdamW betas.")(f)
        f = click.option("--weight-decay", type=click.FloatRange(min=0), default=None, metavar="WD",
                         help="Weight decay, not applied to biases and norms: L2 for SGD and Adam, decoupled for "
                              "AdamW.  [default: sgd 5e-4, adam 0, adamw 0.01]")(f)
        f = click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, metavar="M",
                         help="SGD momentum.")(f)
        f = click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd",
                         show_default=True, help="Optimizer.")(f)
        if lr_list:
            f = click.option("--lr", "lr", type=NumberList(float), multiple=True, metavar="LR[,LR...]",
                             help="Peak learning rate(s), a sweep axis like --temperature.  "
                                  "[default: sgd 0.05, adam/adamw 0.001]")(f)
        else:
            f = click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, metavar="LR",
                             help="Peak learning rate.  [default: sgd 0.05, adam/adamw 0.001]")(f)
        return f
    return add


def _optim(optimizer, lr, momentum, weight_decay, betas, eps, schedule, warmup_epochs):
    from kdpipe.engine import OptimConfig
    from kdpipe.sweep import check_optimizer_uses
    ctx = click.get_current_context()
    check_optimizer_uses(optimizer, [n for n in ("momentum", "betas", "eps")
                                     if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT])
    return OptimConfig(lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule, optimizer=optimizer,
                       betas=tuple(betas), eps=eps, warmup_epochs=warmup_epochs)


def _amp(device, amp):
    return (device.type == "cuda") if amp is None else amp


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdpipe")
def main():
    """kdpipe: cache a teacher's logits once (stage one), train many students from them (stage two)."""
    from kdpipe.util import env_threads
    env_threads()
    check_one_process(click.get_current_context().invoked_subcommand)


TORCHRUN_COMMANDS = ("dump-logits", "train-student")  # the commands that join torchrun's process group


def check_one_process(command: str | None) -> None:
    """Every other command is one process: under torchrun each rank ran it again, so two trainings of one
    teacher met at its lock ("being trained by another kdpipe"), and compress, report or export wrote one --out
    from several processes at once."""
    if command in TORCHRUN_COMMANDS or "WORLD_SIZE" not in os.environ:
        return
    from kdpipe.distributed import world_size_from_env
    world = world_size_from_env()
    if world > 1:
        raise KDPipeError(f"{command} runs as one process, and this is one of {world} that torchrun started "
                          f"(WORLD_SIZE={world}): start it with plain kdpipe (or python -m kdpipe); only "
                          f"{' and '.join(TORCHRUN_COMMANDS)} run under torchrun")


@main.command("train-teacher")
@data_options
@click.option("--arch", required=True, metavar="SPEC", help="Teacher architecture: " + ARCH_SPEC_HELP + ".")
@arch_args_option
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, metavar="N",
              help="Training epochs.")
@click.option("--out", required=True, type=OutPath(dir_okay=False), metavar="FILE.pt",
              help="Where to save the teacher checkpoint.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, metavar="B",
              help="Training batch size.")
@policy_options
@optim_options(lr_list=False)
@click.option("--seed", type=SEED, default=0, show_default=True, metavar="S",
              help="Seed of init, order and views.")
@device_option
@click.option("--amp/--no-amp", default=None, help="bf16 autocast (default: on with CUDA, off on CPU).")
@click.option("--checkpoint-every", type=FloatRange(min=0), default=10.0, show_default=True, metavar="MINUTES",
              help="Also checkpoint the training every MINUTES within an epoch (OUT.checkpoint is written at the end "
                   "of every epoch anyway); 0: only at epoch ends.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (else refused, before any training), and "
              "start over if OUT.checkpoint holds a training with other settings. An OUT trained with the same "
              "settings on the same data is kept (delete it to train again).")
def train_teacher_cmd(data_spec, data_root, image_size, resize, limit, arch, arch_args, epochs, out, batch_size, policy,
                      padding, size, optimizer, lr, momentum, weight_decay, betas, eps, schedule, warmup_epochs, seed,
                      device, amp, checkpoint_every, overwrite):
    """Train a teacher and save a checkpoint that records its architecture, classes, input
    normalization and size, the dataset fingerprint and its test accuracy. The training checkpoints to
    OUT.checkpoint at every epoch's end: after a crash, Ctrl-C or SIGTERM, the same command resumes it."""
    if Path(out).is_file() and not overwrite:  # a teacher may have taken hours, and caches name its sha256
        raise KDPipeError(f"{out} already exists: give another --out, or --overwrite to replace it")
    check_policy_options(policy, padding, size)
    from kdpipe.data import check_splits, limited, load_dataset
    from kdpipe.models import check_model, parse_arch_args
    from kdpipe.teacher import train_teacher
    from kdpipe.util import pick_device

    optim = _optim(optimizer, lr, momentum, weight_decay, betas, eps, schedule, warmup_epochs)
    dev = pick_device(device)
    train = limited(load_dataset(data_spec, "train", data_root, image_size, resize), limit)
    test = limited(load_dataset(data_spec, "test", data_root, image_size, resize), limit)
    check_splits(train, test)
    pol = view_policy(policy, train, padding, size)
    args = parse_arch_args(arch_args)
    check_model(arch, train.num_classes, pol.output_shape(train.image_shape), args)
    _term_as_interrupt()
    try:
        res = train_teacher(train, test, arch, epochs, out, policy=pol, batch_size=batch_size, arch_args=args,
                            optim=optim, seed=seed, device=dev, amp=_amp(dev, amp), log=click.echo,
                            checkpoint_every=checkpoint_every, overwrite=overwrite)
    except KeyboardInterrupt:
        from kdpipe.teacher import teacher_checkpoint_path
        ck = teacher_checkpoint_path(out)
        click.echo("\ninterrupted: " + (f"the training's last checkpoint is kept in {ck}; run the same command again "
                                        "to resume" if ck.is_file() else "the training had not begun, nothing is kept"),
                   err=True)
        sys.exit(130)
    click.echo(f"teacher {'kept in' if res.get('kept') else 'saved to'} {res['path']} (test top-1 "
               f"{res['test_top1']:.4f})")


@main.command("dump-logits")
@teacher_options
@normalization_options
@data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which split to dump.")
@click.option("--views", type=int, default=None, metavar="K",
              help="Views per sample; set it to the students' planned epochs.  [required]")
@policy_options
@click.option("--seed", type=SEED, default=0, show_default=True, metavar="S",
              help="Seed of the view parameters.")
@click.option("--logits-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="How raw logits are stored.")
@click.option("--codec", default="raw", show_default=True, metavar="raw|topk:K",
              help="raw: every logit of every row; topk:K: the K largest logits of each row, their classes and "
                   "the log-mass of the other classes at each --temperatures T (README: Top-k codec).")
@click.option("--temperatures", type=NumberList(float), multiple=True, metavar="T[,T...]",
              help="With --codec topk:K: the temperatures stage two may train at (the rest mass is stored for "
                   "each; stage two refuses others).")
@click.option("--batch-size", type=int, default=512, show_default=True, metavar="B", help="Teacher batch size.")
@click.option("--shard-rows", type=int, default=65536, show_default=True, metavar="ROWS",
              help="Rows per HDF5 shard (the unit of resumption).")
@device_option
@click.option("--amp/--no-amp", default=False, show_default=True, help="Run the teacher under bf16 autocast.")
@click.option("--yes", is_flag=True, help="Dump even when the cache would exceed the free disk space or 10x the "
                                        "decoded dataset (without it such a dump is refused, saying its size).")
@click.option("--force", is_flag=True, help="Dump even if the probe finds the teacher at chance level or its outputs "
              "look like probabilities.")
@click.option("--overwrite", is_flag=True, help="Start over if OUT holds a cache made with other arguments (with the same arguments a dump resumes).")
@click.option("--like", type=click.Path(), default=None, metavar="CACHE_DIR",
              help="Dump over exactly the views of another cache (its data, split, limit, view policy, seed and K), "
                   "so that the two form an ensemble for train-student; --data/--data-root only say where its data "
                   "lies now, and an explicit option that differs from the cache's is refused.")
@click.option("--features", "features", multiple=True, metavar="LAYER[,LAYER...]",
              help="Also store the teacher's output at this module (its path in named_modules(), e.g. avgpool or "
                   "layer3), float16, for every view: what --loss kd+hint distils from. Repeatable.")
@click.option("--out", required=True, type=OutPath(), metavar="CACHE_DIR", help="Cache directory to write.")
def dump_logits_cmd(teacher_file, teacher_arch, teacher_weights, arch_args, trust_pickle, teacher_output, mean, std,
                    input_range, normalize, data_spec, data_root, image_size, resize, limit, split, views, policy,
                    padding, size, seed, logits_dtype, codec, temperatures, batch_size, shard_rows, device, amp, yes,
                    force, overwrite, like, features, out):
    """Stage one: run the teacher once over K views of every sample and write the logits cache."""
    from kdpipe.checkpoint import load_teacher
    from kdpipe.data import check_splits, limited, load_dataset
    from kdpipe.distributed import from_env
    from kdpipe.teacher import check_planned_size, dump_logits, feature_shapes, planned_size
    from kdpipe.util import pick_device

    if like is not None:  # the other cache's data and views (kdpipe.ensemble.like_cache checks what is given)
        from kdpipe.ensemble import LIKE_OPTIONS, like_cache
        ctx = click.get_current_context()
        given = {k: v for k, v in locals().items() if k in LIKE_OPTIONS
                 and ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
        explicit_data = ctx.get_parameter_source("data_spec") is not click.core.ParameterSource.DEFAULT
        like_data, like_test, like_policy, views, seed, split = like_cache(like, given, data_root,
                                                                          data_spec if explicit_data else None)
    else:
        check_policy_options(policy, padding, size)
    if views is None:
        raise click.UsageError("--views K is required (views per sample; the students' planned epochs)")
    if views <= 0:
        raise InputError(f"--views must be >= 1, got {views}")
    if batch_size <= 0:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_rows <= 0:
        raise InputError(f"--shard-rows must be >= 1, got {shard_rows}")
    if teacher_file is None and teacher_weights is None:
        raise InputError("give a teacher: --teacher FILE (with --teacher-arch SPEC for a state dict or safetensors "
                         "file)")
    check_teacher_once(teacher_file, teacher_weights)
    _term_as_interrupt()  # first: an interruption at any moment gets the message below, not a traceback
    started = time.perf_counter()
    try:
        # torchrun: join the process group first, and load inside together(): a rank whose data or teacher fails
        # to load (a node without its copy) stops every rank with its line. Loaded before joining, it left the
        # others waiting at the rendezvous for the whole KDPIPE_DIST_TIMEOUT (30 minutes), then a traceback.
        dist = from_env(pick_device(device))  # else one process
        with dist.together("loading the data and the teacher"):
            if like is not None:
                data, test, pol = like_data, like_test, like_policy
            else:
                data = limited(load_dataset(data_spec, split, data_root, image_size, resize), limit)
                test = (limited(load_dataset(data_spec, "test", data_root, image_size, resize), limit)
                        if split == "train" else None)
                if split == "train":
                    check_splits(data, test)
                else:  # the test split is checked against the train split it will be compared with
                    check_splits(limited(load_dataset(data_spec, "train", data_root, image_size, resize), limit), data)
                pol = view_policy(policy, data, padding, size)
            teacher = load_teacher(teacher_file, arch=teacher_arch, weights=teacher_weights, arch_args=arch_args,
                                   image_shape=pol.output_shape(data.image_shape), num_classes=data.num_classes,
                                   trust_pickle=trust_pickle, output=teacher_output)
        log = dist.log(click.echo)
        from kdpipe.cache.format import codec_identity, parse_codec
        try:
            codec_ident = codec_identity(parse_codec(codec), _flatten(temperatures), data.num_classes)
        except ValueError as e:
            raise InputError(str(e)) from None
        layers = [x.strip() for v in features for x in v.split(",") if x.strip()]
        feats = feature_shapes(teacher, layers, pol.output_shape(data.image_shape))
        for f in feats:
            log(f"features {f['layer']}: {tuple(f['shape'])} per view, float16")
        check_planned_size(planned_size(data, test, pol, views, logits_dtype, codec_ident, feats), out, yes, log=log)
        log(f"dumping {teacher.arch} logits: {data.spec} {split} ({len(data)} samples) x {views} views "
            f"({pol.spec}) -> {out} on {dist.device}" + (f" x {dist.world} ranks" if dist.world > 1 else ""))
        res = dump_logits(teacher, data, test, out, policy=pol, views=views, seed=seed,
                          logits_dtype=logits_dtype, batch_size=batch_size, shard_rows=shard_rows,
                          device=dist.device, amp=amp, overwrite=overwrite, mean=mean, std=std,
                          input_range=input_range, normalize=normalize, force=force, dist=dist, log=log,
                          codec=codec, temperatures=_flatten(temperatures), features=layers)
        dist.close()
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: complete shards are kept in {out}; run the same command again to resume",
                   err=True)
        sys.exit(130)
    if not dist.is_main:
        _end_distributed(dist)
        return
    click.echo(f"done: {res['rows']:,} rows, {res['bytes'] / 1e6:.2f} MB on disk in {out}, "
               f"{time.perf_counter() - started:.1f}s wall time in all")
    if not res.get("already_complete"):
        rate = res.get("rows_per_s")
        click.echo(f"  computed {res['rows_computed']:,} rows in {res['compute_wall_s']:.1f}s"
                   + (f" ({rate:,.0f} {'rows' if data.kind == 'features' else 'images'}/s)" if rate else "") +
                   (f", {res['resumed_shards']} shard(s) kept from an earlier run" if res["resumed_shards"] else ""))
    click.echo(f"  teacher top-1 on its views {res['views_top1']:.4f}"
               + (f", on the clean test split {res['test_top1']:.4f}" if res.get("test_top1") is not None else ""))
    _end_distributed(dist)


def _end_distributed(dist, code: int = 0) -> None:
    """End a command with exit code `code`. Under torchrun, once the process group is left and everything
    is written and printed, the process ends at once (os._exit), without the interpreter's teardown: there
    gloo's teardown aborted a rank now and then (exit -6 after its work was done; seen on a loaded 2-core
    machine in about one torchrun test in ten, after destroy_process_group had returned), and torchrun then
    reports the whole command as failed."""
    if dist.world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def _term_as_interrupt():
    """SIGTERM stops a dump or a training like Ctrl-C: what is complete is kept, a message says how to resume."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass


@main.command("train-student")
@click.option("--cache", "cache_dir", required=True, multiple=True, type=click.Path(), metavar="CACHE_DIR",
              help="Cache written by dump-logits. Repeat for an ensemble of teachers: caches of the same views "
                   "(dump the others with dump-logits --like), trained against the weighted mean of their "
                   "probabilities at T.")
@click.option("--teacher-weights", type=NumberList(float, hint=(
                  " (in train-student, an ensemble's weights, one per --cache; the teacher file is dump-logits' "
                  "--teacher-weights: stage two reads the teacher's logits from the cache)")),
              default=None, metavar="W,W,...",
              help="An ensemble's weights, one per --cache in order, positive, summing to 1.  [default: equal]")
@click.option("--student", "students", multiple=True, required=True, metavar="SPEC",
              help="Student architecture; repeat for several: " + ARCH_SPEC_HELP + ".")
@arch_args_option
@click.option("--epochs", type=int, default=10, show_default=True, metavar="N", help="Training epochs.")
@click.option("--loss", "loss", cls=LazyHelpOption, default="kd", show_default=True, metavar="NAME[:OPT=V,...]",
              help_text=loss_help)
@click.option("--temperature", "temperatures", type=NumberList(float), multiple=True, metavar="T[,T...]",
              help="The loss's temperature(s).  [default: the loss's, 4]")
@click.option("--alpha", "alphas", type=NumberList(float), multiple=True, metavar="A[,A...]",
              help="The loss's alpha(s): kd's weight of the KD term (0 trains from scratch), dkd's weight of "
                   "TCKD.  [default: the loss's, kd 0.9, dkd 1]")
@click.option("--seed", "seeds", type=NumberList(int, top=SEED_MAX), multiple=True, metavar="S[,S...]",
              help="Seed(s) of init and data order.  [default: 0]")
@click.option("--batch-size", type=int, default=STUDENT_BATCH_SIZE, show_default=True, metavar="B",
              help="Training batch size; under torchrun per rank (the effective batch is B x world size).")
@optim_options(lr_list=True)
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              metavar="F", help="Hold this share of the cache's samples out of training (the same rows for every "
                                "run: a fixed seed) and keep each run's best epoch by their top-1 "
                                "(student-best.pt) besides the last (student.pt).")
@click.option("--val-split/--no-val-split", default=False, show_default=True,
              help="Pick each run's best epoch (student-best.pt) on the data's own validation split, never trained "
                   "on: files: validation/ beside evaluation/, imagefolder: val/ beside test/, csv: val rows beside "
                   "test rows, npz: x_val and y_val. Not with --val-fraction.")
@moved_data_options
@click.option("--allow-test-split", is_flag=True,
              help="Train on a cache dumped from the test split (refused without it: the student would learn "
                   "the test set).")
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
@click.option("--checkpoint-every", type=FloatRange(min=0), default=10.0, show_default=True, metavar="MINUTES",
              help="Also checkpoint a pass every MINUTES within an epoch (a checkpoint is written at the end of "
                   "every epoch anyway); 0: only at epoch ends.")
@click.option("--keep-checkpoints/--no-keep-checkpoints", default=False, show_default=True,
              help="Keep RUNS_DIR/checkpoints/ after the pass ends (by default it is removed).")
@click.option("--overwrite", is_flag=True,
              help="Start a run over if its directory holds a run with other settings (with the same settings a "
                   "rerun skips finished runs and resumes the others).")
@click.option("--hint-layer", default=None, metavar="MODULE",
              help="For a loss with a hint term (kd+hint, kd:1,hint:50): the student's layer, by its path in "
                   "named_modules() (e.g. features.3), that a learned projector maps onto the cached teacher "
                   "features.")
@click.option("--hint-feature", default=None, metavar="LAYER",
              help="Which cached teacher feature the hint distils (needed when the cache holds several).")
@click.option("--out", required=True, type=OutPath(), metavar="RUNS_DIR",
              help="Each run writes RUNS_DIR/<run-name>/.")
def train_student_cmd(cache_dir, teacher_weights, students, arch_args, epochs, loss, temperatures, alphas, seeds,
                      batch_size, optimizer, lr, momentum, weight_decay, betas, eps, schedule, warmup_epochs, val_fraction, data_root,
                      data_spec, allow_test_split, device, amp, fuse, train_samples, checkpoint_every,
                      keep_checkpoints, overwrite, hint_layer, hint_feature, out, val_split):
    """Stage two: train students from cached logits. Lists make a sweep (the cartesian product of
    students, temperatures, alphas, learning rates and seeds) for one --loss; runs with the same seed share
    one pass over the data. Each run's metrics.json (and history.csv) holds, per epoch, the mean of every
    term of its loss, train top-1, validation and test top-1 and agreement with the teacher. Each pass
    checkpoints at every epoch's end: after a crash, Ctrl-C or SIGTERM, the same command skips the finished
    runs and resumes the others."""
    from kdpipe.distributed import from_env
    from kdpipe.models import parse_arch_args
    from kdpipe.student import train_students
    from kdpipe.util import pick_device

    temps = _flatten(temperatures)  # empty: the loss's default
    alphs = _flatten(alphas)
    sds = _flatten(seeds) or [0]
    lrs = _flatten(lr)
    if any(x <= 0 for x in lrs):
        raise InputError(f"--lr must be > 0, got {','.join(f'{x:g}' for x in lrs)}")
    optim = _optim(optimizer, lrs[0] if lrs else None, momentum, weight_decay, betas, eps, schedule, warmup_epochs)
    if epochs <= 0:
        raise InputError(f"--epochs must be >= 1, got {epochs}")
    if batch_size <= 0:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    _term_as_interrupt()  # first: an interruption at any moment gets the message below, not a traceback
    try:
        dev = pick_device(device)
        dist = from_env(dev)  # torchrun: DistributedDataParallel, --batch-size per rank; else one process
        res = train_students(list(cache_dir), list(students), epochs, out, loss=loss, temperatures=temps, alphas=alphs,
                             seeds=sds, batch_size=batch_size, optim=optim, lrs=lrs, val_fraction=val_fraction,
                             train_samples=train_samples,
                             device=dist.device, data_root=data_root, data_spec=data_spec,
                             allow_test_split=allow_test_split, amp=_amp(dev, amp), dist=dist,
                             arch_args=parse_arch_args(arch_args),
                             log=dist.log(click.echo),
                             fuse={"auto": None, "compile": "compile", "on": True, "off": False}[fuse],
                             overwrite=overwrite, checkpoint_every=checkpoint_every,
                             keep_checkpoints=keep_checkpoints, val_split=val_split,
                             teacher_weights=teacher_weights, hint_layer=hint_layer,
                             hint_feature_name=hint_feature)
        dist.close()
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted; rank 0 says it
            click.echo(f"\ninterrupted: finished runs and the last checkpoint of each pass are kept in {out}; "
                       "run the same command again to resume", err=True)
        sys.exit(130)
    code = 0
    if dist.is_main:
        skipped = getattr(res, "skipped", 0)
        click.echo(f"{len(res) - skipped} run(s) written under {out}"  # a rerun of a finished sweep wrote nothing
                   + (f", {skipped} skipped (finished before)" if skipped else ""))
        bad = [m["name"] for m in res if m.get("diverged_epoch")]
        if bad:  # written and marked (metrics.json's diverged_epoch, the report), but the call did not succeed
            click.echo(f"Error: {len(bad)} run(s) diverged (their loss became NaN or infinite): {', '.join(bad)}; "
                       "lower --lr, or change the loss's options", err=True)
            code = 1
    _end_distributed(dist, code)


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@click.option("--out", required=True, type=OutPath(), metavar="DIR", help="Where to write report.md and plots.")
@click.option("--mix-datasets", is_flag=True,
              help="Put runs of several datasets in one report (refused otherwise; each row names its dataset).")
def report_cmd(run_dirs, out, mix_datasets):
    """Write a markdown table (teacher, every student, each setting over its seeds) and PNG plots
    (accuracy against parameters, teacher vs students, learning curves) from run directories."""
    from kdpipe.report import build_report
    res = build_report(run_dirs, out, mix_datasets=mix_datasets)
    click.echo(f"report of {res['runs']} run(s): {res['report']}")
    if res["unfinished"]:
        click.echo(f"  unfinished: {len(res['unfinished'])} run(s) not reported (run their train-student command "
                   f"again): {', '.join(Path(u).name for u in res['unfinished'])}")
    for p in res["plots"]:
        click.echo(f"  plot: {p}")


@main.command("inspect")
@click.argument("cache_dir", type=click.Path(), metavar="CACHE_DIR|CHECKPOINT")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (or the checkpoint's record) as JSON.")
def inspect_cmd(cache_dir, as_json):
    """Print what a cache holds: teacher, data, views, classes, codec, rows, bytes, creation. Given a kdpipe
    checkpoint (a teacher.pt or student.pt) instead: its model, data, training and test top-1; given the
    checkpoint of a training in progress (teacher.pt.checkpoint, RUNS/checkpoints/pass-*.pt): where it
    stands and each run's record per epoch so far."""
    import numpy as np

    if Path(cache_dir).is_file():
        _inspect_checkpoint(Path(cache_dir), as_json)
        return
    if not (Path(cache_dir) / "manifest.json").exists() and (Path(cache_dir) / "student.pt").is_file():
        # a run directory, as export takes it: its student (it was refused as 'not a kdpipe cache')
        _inspect_checkpoint(Path(cache_dir) / "student.pt", as_json)
        return
    if not Path(cache_dir).exists() and _is_training_checkpoint(Path(cache_dir)):
        raise KDPipeError(_no_training_checkpoint(Path(cache_dir)))

    from kdpipe.cache.format import feature_column as fmt_feature
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
               f"{t['fingerprint'][:12]}), test top-1 "
               + (f"{t['test_top1']:.4f}" if isinstance(t.get("test_top1"), (int, float)) else "unknown"))
    from kdpipe.data import resize_mode
    stored = (f" (photos decoded by --image-size {d['image_size']} --resize {resize_mode(d)})"
              if d.get("image_size") else "")
    click.echo(f"  data      {d['spec']} {d['split']}: {d['num_samples']:,} samples of {tuple(d['image_shape'])}"
               f"{stored}, {m['num_classes']} classes, sha256 {d['fingerprint'][:12]}")
    if "ops" in v:  # a composition of view ops, each with its version
        ops = f"{v['spec']} (" + ", ".join(f"{o['name']} v{o['version']}" for o in v["ops"]) + ")"
    else:  # a named policy of a version 1 cache
        ops = f"{v['policy']} v{v['policy_version']} (" + (", ".join(
            f"{k}={val}" for k, val in v.get("options", {}).items()) or "no options") + ")"
    click.echo(f"  views     K={v['K']} policy {ops}, "
               f"seed {v['seed']}, params {', '.join(v['columns']) or '-'}")
    from kdpipe.cache.format import describe_codec
    click.echo(f"  logits    codec {describe_codec(m['logits'])}, {m['logits']['dtype']}, rows {m['rows']:,} "
               f"({m['row_order']}), input {tuple(m['input']['shape'])}"
               + (f", teacher output {t['output']}" if t.get("output") not in (None, "auto") else ""))
    for f in m.get("features", []):  # cached features (dump-logits --features)
        col = fmt_feature(f["layer"], f["shape"])
        click.echo(f"  features  {f['layer']} {tuple(f['shape'])} {f.get('dtype', 'float16')} at {col.path}, "
                   f"{col.np_dtype(m).itemsize * int(np.prod(f['shape'])):,} bytes per row")
    from kdpipe.normalization import describe
    click.echo(f"  input     normalization {describe(m['input'])}")
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
        unit = "rows" if d.get("kind") == "features" else "images"
        click.echo(f"  dump      {dump['rows_per_s']:,.0f} {unit}/s on {dump['device']}"
                   + (f" under {amp} autocast" if amp else "") + f", teacher top-1 on views {dump['views_top1']:.4f}")


def _is_training_checkpoint(path: Path) -> bool:
    return path.name.endswith(".checkpoint") or (path.parent.name == "checkpoints" and path.name.startswith("pass-"))


def _no_training_checkpoint(path: Path) -> str:
    """A training checkpoint that is not there: removed when its training ended (the README has users follow one
    from another shell), which "no cache at ...: the directory does not exist" did not say."""
    saved = str(path)[:-len(".checkpoint")] if path.name.endswith(".checkpoint") else \
        str(path.parent.parent / "<run>" / "student.pt")
    return (f"no training checkpoint at {path}: a training removes its checkpoint when it ends (inspect what it "
            f"saved, {saved}), and one not begun has none")


def _inspect_checkpoint(path: Path, as_json: bool) -> None:
    """`kdpipe inspect FILE.pt`: a kdpipe checkpoint's record, without its weights."""
    from kdpipe.checkpoint import CHECKPOINT_VERSION, load_checkpoint_file, sniff
    obj = load_checkpoint_file(path) if sniff(path) == "torch" else None
    if isinstance(obj, dict) and "kdpipe_pass_checkpoint" in obj:
        _inspect_training_checkpoint(path, obj, as_json)
        return
    if not (isinstance(obj, dict) and obj.get("kdpipe_checkpoint") == CHECKPOINT_VERSION):
        raise KDPipeError(f"{path} is a file but not a kdpipe checkpoint: inspect reads a cache directory, a "
                          "teacher.pt / student.pt that kdpipe wrote, or the checkpoint of a training in progress")
    record = {k: v for k, v in obj.items() if k != "state_dict"}
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    model, data = record.get("model") or {}, record.get("dataset") or {}
    args = model.get("args") or {}
    click.echo(f"checkpoint {path}  (kdpipe checkpoint {obj['kdpipe_checkpoint']}, {record.get('role', 'model')}, "
               f"{path.stat().st_size / 1e6:.2f} MB)")
    click.echo(f"  model     {model.get('spec', record['arch'])}"
               + (" " + ",".join(f"{k}={v}" for k, v in args.items()) if args else "")
               + f", {record.get('parameters', 0):,} parameters, input {tuple(record['image_shape'])}, "
               f"{record['num_classes']} classes")
    if data:
        click.echo(f"  data      {data.get('spec')} {data.get('split', '')}: {data.get('num_samples', 0):,} samples, "
                   f"sha256 {str(data.get('fingerprint', ''))[:12]}")
    click.echo(f"  input     mean {[round(m, 4) for m in record['mean']]}, std {[round(s, 4) for s in record['std']]}")
    training = record.get("training") or {}
    if record.get("epochs") or training:
        how = " ".join(f"{training[k]}" for k in ("optimizer",) if k in training)
        how += f" lr {training['lr']:g}" if "lr" in training else ""
        how += f" {training['schedule']}" if "schedule" in training else ""
        wall = f", {record['train_wall_s']:.1f} s" if record.get("train_wall_s") else ""
        click.echo(f"  trained   {record.get('epochs', '?')} epochs{', ' + how.strip() if how.strip() else ''}{wall}")
    top1 = record.get("test_top1")
    click.echo(f"  test      top-1 {top1:.4f}" if isinstance(top1, (int, float)) else "  test      top-1 not recorded")
    history = record.get("history") or []
    if history:
        click.echo("  history   test top-1 by epoch: " + ", ".join(f"{h['test_top1']:.4f}" for h in history))


def _inspect_training_checkpoint(path: Path, c: dict, as_json: bool) -> None:
    """`kdpipe inspect` of a training in progress (a teacher's FILE.pt.checkpoint, a pass's
    RUNS/checkpoints/pass-*.pt, loaded as `c`): where it stands and each run's per-epoch record so far."""
    from kdpipe.resume import CHECKPOINT_VERSION
    if c.get("kdpipe_pass_checkpoint") != CHECKPOINT_VERSION:
        raise KDPipeError(f"{path} is the checkpoint of a training by another kdpipe version: inspect it with that "
                          "version")
    epoch, step = c["position"]
    runs = {}
    for name, settings in c["runs"].items():
        st = c["state"][name]
        track = st.get("track")
        rows = track if isinstance(track, list) else (track or {}).get("history")  # a teacher's, a student's
        if not rows:  # no evaluation record: the losses
            rows = [{"epoch": i + 1, "loss": v} for i, v in enumerate(st["history"])]
        runs[name] = {"settings": settings, "epochs_done": len(st["history"]), "history": rows}
    record = {"checkpoint": str(path), "seed": c["seed"], "epochs": c["epochs"],
              "position": {"epoch": epoch, "step": step}, "images_seen": c["seen"], "train_wall_s": c["wall_s"],
              "runs": runs}
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    from kdpipe.util import human_duration
    at = f"in epoch {epoch + 1}/{c['epochs']}, after step {step}" if step else f"{epoch}/{c['epochs']} epochs done"
    click.echo(f"training in progress {path}  ({path.stat().st_size / 1e6:.2f} MB): {at}, seed {c['seed']}, "
               f"{human_duration(c['wall_s'])} of training so far; the command that wrote it resumes it")
    for name, r in runs.items():
        arch = r["settings"].get("arch") or r["settings"].get("student") or "?"
        click.echo(f"  {name}  ({arch}, {r['epochs_done']} epochs done)")
        if any(h.get("test_top1") is not None for h in r["history"]):
            click.echo("    test top-1 by epoch: " + ", ".join(
                f"{h['test_top1']:.4f}" if h.get("test_top1") is not None else "-" for h in r["history"]))
        click.echo("    loss by epoch: " + ", ".join(f"{h['loss']:.4f}" for h in r["history"]))


@main.command("verify-cache")
@click.argument("cache_dir", type=click.Path(), metavar="CACHE_DIR")
@teacher_options
@click.option("--sample", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="How many random rows the teacher re-computes.")
@moved_data_options
@click.option("--seed", type=SEED, default=0, show_default=True, metavar="S", help="Seed of the row sample.")
@device_option
def verify_cache_cmd(cache_dir, teacher_file, teacher_arch, teacher_weights, arch_args, trust_pickle, teacher_output,
                     sample, data_root, data_spec, seed, device):
    """Check every shard's checksums and shapes; with a teacher (--teacher), re-compute sampled rows with
    the cache's input normalization (and, unless given, the recorded architecture and output entry).
    Exits 1 on a fault, naming the shard and rows."""
    from kdpipe.util import pick_device
    from kdpipe.verify import repair_hint, verify_cache
    check_teacher_once(teacher_file, teacher_weights)
    if teacher_file is None and teacher_weights is None and teacher_arch is None:
        ctx = click.get_current_context()
        unused = [f"--{name.replace('_', '-').replace('-spec', '')}" for name in
                  ("arch_args", "trust_pickle", "teacher_output", "sample", "seed", "data_root", "data_spec")
                  if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if unused:
            raise InputError(f"{unused[0]} is for the teacher check, which needs the teacher: give --teacher FILE "
                             "as well (without it verify-cache checks the shards only)")
    faults = verify_cache(cache_dir, teacher_file=teacher_file, teacher_arch=teacher_arch,
                          teacher_weights=teacher_weights, arch_args=arch_args, trust_pickle=trust_pickle,
                          teacher_output=teacher_output, sample=sample, data_root=data_root,
                          data_spec=data_spec, seed=seed,
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


@main.command("compress")
@click.option("--teacher", "teacher_file", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="The teacher: a kdpipe checkpoint (it records the architecture and the input normalization), "
                   "or a state dict or .safetensors file with --teacher-arch and its normalization.")
@click.option("--teacher-arch", default=None, metavar="SPEC",
              help="Architecture that a state-dict or safetensors teacher file fills: " + ARCH_SPEC_HELP + ".")
@arch_args_option
@normalization_options
@data_options
@click.option("--students", "students_dir", type=click.Path(file_okay=False), multiple=True, metavar="RUNS_DIR",
              help="Also measure the distilled students trained into RUNS_DIR (and each of them int8-quantized); "
                   "RUNS_DIR may be one run, and the option may be repeated.")
@click.option("--quantize", type=click.Choice(["dynamic", "static", "none"]), multiple=True, metavar="KIND",
              help="int8 post-training quantization of the teacher: dynamic (nn.Linear weights), static (FX graph "
                   "mode, calibrated); repeat for both, 'none' for neither.  [default: dynamic and static]")
@click.option("--backend", type=click.Choice(["x86", "fbgemm", "onednn", "qnnpack"]), default="x86",
              show_default=True, help="torch's quantized CPU backend.")
@click.option("--calibration", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="Training images (random, clean views) that calibrate static quantization.")
@click.option("--prune", type=click.Choice(["unstructured", "channels", "none"]), multiple=True, metavar="KIND",
              help="Magnitude pruning of the teacher: unstructured (weights zeroed) or channels (layers rebuilt "
                   "smaller); repeat for both, 'none' for neither.  [default: both]")
@click.option("--sparsity", "sparsities", type=NumberList(float), multiple=True, metavar="S[,S...]",
              help="Pruned fractions (of weights, or of each prunable layer's channels).  [default: 0.5,0.8]")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=1, show_default=True, metavar="N",
              help="Epochs of fine-tuning after pruning (0: none).")
@click.option("--finetune-loss", type=click.Choice(["kd", "ce"]), default="kd", show_default=True,
              help="Fine-tune pruned models with KD from the teacher (T 4, alpha 0.9) or plain cross-entropy.")
@click.option("--finetune-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Fine-tune on N training images only (each epoch steps on all N), drawn from a fixed seed as "
                   "--limit draws them, so a folder sorted by class keeps every class (default: all).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True, metavar="LR",
              help="Peak learning rate of the fine-tuning (cosine schedule).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="Timed forward passes per batch size; the median is reported.")
@click.option("--seed", type=SEED, default=0, show_default=True, metavar="S",
              help="Seed of the calibration sample and the fine-tuning.")
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE",
              help="Where pruned models are fine-tuned: cpu, auto (CUDA when present), cuda or cuda:N. Every "
                   "measurement (accuracy, latency, quantization) is on the CPU.")
@click.option("--out", required=True, type=OutPath(), metavar="DIR",
              help="Where to write compress.md, compress.json, compress.png and models/.")
def compress_cmd(teacher_file, teacher_arch, arch_args, mean, std, input_range, normalize, data_spec, data_root, image_size, resize, limit, students_dir, quantize, backend, calibration, prune,
                 sparsities, finetune_epochs, finetune_loss, finetune_samples, lr, repeats, seed, device, out):
    """Compare distillation with int8 quantization and magnitude pruning of the same teacher: one row per
    model (test top-1, agreement with the teacher, parameters, size on disk, CPU latency per image, or per
    row of a feature table, at batch 1 and 64), a table, a JSON file and a plot. Measured on the CPU; pruned
    models can be fine-tuned on a GPU (--device)."""
    from kdpipe.compress import PRUNE_KINDS, QUANT_KINDS, compress
    from kdpipe.util import pick_device
    from kdpipe.data import limited, load_dataset

    quant = QUANT_KINDS if not quantize else tuple(q for q in quantize if q != "none")
    prn = PRUNE_KINDS if not prune else tuple(p for p in prune if p != "none")
    if not prn:  # the options of pruning and its fine-tuning, given with no pruning, would be ignored
        ctx = click.get_current_context()
        given = [flag for n, flag in (("sparsities", "--sparsity"), ("finetune_epochs", "--finetune-epochs"),
                                      ("finetune_loss", "--finetune-loss"), ("finetune_samples", "--finetune-samples"),
                                      ("lr", "--lr"))
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise InputError(f"{given[0]} is an option of pruning, and --prune none prunes nothing: leave "
                             f"{given[0]} out, or give --prune unstructured or channels")
    if prn:  # the options first (as compress() checks them), then the teacher, then the data
        from kdpipe.engine import OptimConfig
        OptimConfig(lr=lr)
    from kdpipe.compress import check_teacher_file
    own = teacher_arch is not None or arch_args is not None or any(v for v in (mean, std, input_range, normalize))
    check_teacher_file(teacher_file, teacher_arch, own=own and teacher_arch is None)  # before the data is decoded
    full_train = load_dataset(data_spec, "train", data_root, image_size, resize)
    train = limited(full_train, limit)
    test = limited(load_dataset(data_spec, "test", data_root, image_size, resize), limit)
    res = compress(teacher_file, train, test, out, students_dir=students_dir, full_train=full_train,
                   quantize=quant, prune=prn, sparsities=_flatten(sparsities) or (0.5, 0.8), backend=backend,
                   calibration=calibration, finetune_epochs=finetune_epochs, finetune_loss=finetune_loss,
                   finetune_samples=finetune_samples, lr=lr, repeats=repeats, seed=seed,
                   device=pick_device(device), teacher_arch=teacher_arch, arch_args=arch_args,
                   mean=mean, std=std, input_range=input_range, normalize=normalize, log=click.echo)
    click.echo(f"{res['rows']} model(s): {res['table']} ({res['json']}, plot {res['plot']})")


@main.command("export")
@click.argument("model", type=click.Path(), metavar="RUN_DIR|MODEL")
@click.option("--format", "fmt", required=True, metavar="FORMAT",
              help="torchscript, onnx (needs the onnx and onnxscript packages) or pt2 (torch.export).")
@click.option("--out", required=True, type=OutPath(dir_okay=False), metavar="FILE", help="The file to write.")
@click.option("--overwrite", is_flag=True, help="Replace FILE (and FILE.json) if it exists (else refused).")
def export_cmd(model, fmt, out, overwrite):
    """Write a run's model (or a kdpipe checkpoint) for deployment, with its input normalization inside: it
    takes uint8 images (B, C, H, W), or float32 features (B, D), and returns logits. The file is loaded back
    and compared with PyTorch (ONNX with onnxruntime, where installed). FILE.json beside it gives the class
    of each output, the preprocessing its input needs and the checkpoint it came from."""
    from kdpipe.export import EXPORT_PIP, export_model, load_model, preprocessing, write_card
    loaded = load_model(model)
    res = export_model(loaded, fmt, out, overwrite=overwrite)
    check = (f"matches PyTorch (max relative error {res['max_relative_error']:.1e})" if res["checked"] else
             f"not checked: onnxruntime is not installed ({EXPORT_PIP})")
    click.echo(f"{res['format']} {res['arch']} -> {res['path']} ({res['bytes'] / 1e6:.2f} MB), input "
               f"{res['input']}, {check}")
    click.echo("  its input, made as in training: " + "; then ".join(preprocessing(loaded)))
    click.echo(f"  classes, preprocessing and source: {write_card(res, loaded)}")
    best = Path(model) / "student-best.pt"
    if Path(model).is_dir() and best.is_file():  # a run whose validation picked an epoch: say which one this is
        try:
            m = json.loads((Path(model) / "metrics.json").read_text())
            last, picked = m.get("epochs", "?"), m["best"]["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            last, picked = "?", "?"
        if picked != last or picked == "?":  # the picked epoch is the last one: student.pt is that epoch
            click.echo(f"  note: this is student.pt, the last epoch ({last}); the validation picked epoch {picked} "
                       f"(student-best.pt): export {best} for that one")


if __name__ == "__main__":
    main()
