"""The top-k codec (issue 12): bytes per row, and what keeping only the top k logits costs a student.

1. Bytes per row of every codec: measured on disk (the shards of the caches dumped below, divided by their
   rows) for Fashion-MNIST's 10 classes, and from the columns' declarations (kdpipe.cache.format.row_bytes:
   what dump-logits plans and writes) for 100, 1,000 and 50,000 classes.
2. Students trained from full logits (a raw float16 cache) and from top-k caches at k = 1, 2, 3, 5, each
   with kdpipe's (k + 1)-bin KL (the rest kept as one bin) and with the naive alternatives users report
   as biased (kdpipe.losses.topk_kl's rest modes, registered here as bench-only losses):
     drop         the KL's sum over the top k alone: the teacher's true top-k probabilities (as stored
                  top-k log-probabilities give them) against the student's, the rest bin left out;
     zero         the rest taken as zero mass: the teacher's top-k probabilities renormalized (all one
                  knows from top-k logits alone) against the student's full distribution;
     renormalize  teacher and student both renormalized over the teacher's top k.
   Test top-1 and agreement with the teacher (mean ± std over the seeds), plus scratch (alpha = 0).
3. The bias of each loss itself, at the trained full-logit student: on the test split, each top-k loss
   against the dense KL (mean value, and the cosine between its gradient and the dense KL's).

Every cache goes through dump_logits (stage one) and every student through train_students (stage two).
CPU: Fashion-MNIST (Debian's copy by default), a cnn_small teacher trained on more samples than the
students see, mlp_100 students, T = 4, alpha = 0.9, K = E views.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import emit, header, load_split, quiet, setup, subset_npz, workdir


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fashion", default="fashion-mnist",
                   help="Fashion-MNIST: 'fashion-mnist' (Debian's package, the default) or an npz.")
    p.add_argument("--n-train", type=int, default=2000, help="The students' train samples (the first N).")
    p.add_argument("--teacher-n-train", type=int, default=60000, help="The teacher's train samples (the first M).")
    p.add_argument("--n-test", type=int, default=2000, help="Test samples (the first N).")
    p.add_argument("--teacher", default="cnn_small")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--student", default="mlp_100")
    p.add_argument("--epochs", type=int, default=10, help="Students' epochs E (and views K = E).")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ks", default="1,2,3,5")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperatures", default="1,4", help="Declared at dump time (must hold --temperature).")
    p.add_argument("--policy", default="crop:2+flip")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary one, removed after).")
    return p.parse_args(argv)


def _register_naive_losses():
    """kd with the naive rest modes of topk_kl: for this benchmark only (not in the CLI's registry)."""
    from kdpipe.losses import KDLoss, register_loss, topk_kl

    def variant(mode):
        class Naive(KDLoss):
            def topk_kl(self, out, teacher):
                return topk_kl(out, teacher, self.temperature, rest=mode)
        Naive.__name__ = f"KD_{mode}"
        return Naive

    for mode in ("drop", "zero", "renormalize"):
        register_loss(f"kd-{mode}")(variant(mode))


def _declared_bytes(classes: int, dtype: str, codec) -> int:
    from kdpipe.cache import format as fmt
    m = {"dataset": {"num_classes": classes, "num_samples": 1}, "views": {"columns": ["dy", "dx", "flip"]},
         "logits_dtype": dtype, "logits_codec": codec}
    return fmt.row_bytes(m)


def _mean_std(xs):
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main(argv=None):
    args = _args(argv)
    args.quick = False
    dev = setup(args)
    header("top-k codec: bytes per row, student accuracy from top-k targets, the naive alternatives",
           argv=None if argv is None else ["bench/topk.py"] + list(argv))
    from kdpipe.cache import format as fmt
    from kdpipe.cache.reader import Cache
    from kdpipe.checkpoint import load_teacher
    from kdpipe.engine import OptimConfig
    from kdpipe.losses import TopKTargets, kl_sum, topk_kl
    from kdpipe.student import clean_test_logits, train_students
    from kdpipe.models import create_model
    from kdpipe.teacher import dump_logits, train_teacher
    from kdpipe.views import create_policy
    import torch.nn.functional as F

    _register_naive_losses()
    ks = [int(k) for k in args.ks.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    T, alpha, E = args.temperature, args.alpha, args.epochs
    seeds = tuple(range(args.seeds))
    policy = create_policy(args.policy)
    optim = OptimConfig(lr=args.lr)
    t_all = time.perf_counter()
    with workdir(args) as work:
        full_train, full_test = load_split(args.fashion, "train"), load_split(args.fashion, "test")
        train, test = subset_npz(full_train, full_test, args.n_train, args.n_test, work / "students.npz")
        tdata, _ = subset_npz(full_train, full_test, args.teacher_n_train, args.n_test, work / "teacher.npz")
        emit(f"data: {args.fashion}, students on the first {len(train)} train images, the teacher on the first "
             f"{len(tdata)}, test on the first {len(test)}; teacher {args.teacher} ({args.teacher_epochs} epochs), "
             f"student {args.student}, E = K = {E}, T = {T:g}, alpha = {alpha:g}, seeds {list(seeds)}, views "
             f"{policy.spec}, batch {args.batch}, SGD lr {args.lr:g}, device {dev}, torch threads "
             f"{torch.get_num_threads()}")
        t0 = time.perf_counter()
        tpath = work / "teacher.pt"
        res = train_teacher(tdata, test, args.teacher, args.teacher_epochs, tpath, policy=policy,
                            batch_size=args.batch, optim=optim, seed=0, device=dev, log=quiet)
        emit(f"teacher: test top-1 {res['test_top1']:.4f} ({time.perf_counter() - t0:.0f}s)")

        caches = {}
        for name, dtype, codec, tt in [("raw float16", "float16", "raw", ()), ("raw float32", "float32", "raw", ())] + [
                (f"topk:{k} float16", "float16", f"topk:{k}", temps) for k in ks]:
            t0 = time.perf_counter()
            out = work / name.replace(" ", "-").replace(":", "")
            dump_logits(load_teacher(tpath), train, test, out, policy=policy, views=E, seed=1, logits_dtype=dtype,
                        device=dev, overwrite=True, log=quiet, codec=codec, temperatures=tt)
            caches[name] = out
            c = Cache(out)
            shards = sum((out / s["file"]).stat().st_size for s in c.manifest["shards"])
            logits_cols = sum(n for s in c.manifest["shards"] for p, (_, n) in s["layout"].items()
                              if p.startswith("logits"))
            emit(f"  dumped {name}: {c.rows:,} rows, {shards / c.rows:.1f} bytes per row on disk (HDF5 metadata "
                 f"included), {fmt.row_bytes(c.manifest)} declared, of which logits columns "
                 f"{logits_cols / c.rows:.0f} ({time.perf_counter() - t0:.0f}s)")

        emit("")
        emit(f"bytes per row from the declarations (3 view-parameter columns; topk with {len(temps)} declared "
             "temperatures); in brackets the logits columns alone:")
        emit("| classes | raw float16 | raw float32 | " + " | ".join(f"topk:{k} float16" for k in ks) + " |")
        emit("|---|---|---|" + "---|" * len(ks))
        for classes in (10, 100, 1000, 50000):
            base = _declared_bytes(classes, "float16", None) - 2 * classes
            cells = [_declared_bytes(classes, "float16", None), _declared_bytes(classes, "float32", None)]
            cells += [_declared_bytes(classes, "float16", {"codec": "topk", "k": k, "temperatures": temps}) for k in ks]
            emit(f"| {classes:,} | " + " | ".join(f"{b:,} ({b - base:,})" for b in cells) + " |")

        emit("")
        results: dict[str, dict[str, list[float]]] = {}

        def run(row, cache, loss="kd", alphas=(alpha,)):
            t0 = time.perf_counter()
            out = train_students(caches[cache], [args.student], E, work / f"runs-{row}", loss=loss,
                                 temperatures=(T,), alphas=alphas, seeds=seeds, batch_size=args.batch, optim=optim,
                                 device=dev, log=quiet)
            emit(f"  {row}: {time.perf_counter() - t0:.0f}s")
            return out

        out = run("full", "raw float16", alphas=(0.0, alpha))
        for label, keep in (("scratch (alpha 0)", lambda r: r["alpha"] == 0),
                            ("full logits", lambda r: r["alpha"] != 0)):
            sel = [r for r in out if keep(r)]
            results[label] = {"top1": [r["test_top1"] for r in sel], "agree": [r["teacher_agreement"] for r in sel]}
        full_run = next(r for r in out if r["alpha"] != 0 and r["seed"] == 0)
        for k in ks:
            for mode, loss in (("rest kept (kdpipe)", "kd"), ("rest dropped", "kd-drop"),
                               ("rest as zero", "kd-zero"), ("both renormalized", "kd-renormalize")):
                sel = run(f"top-{k} {mode}", f"topk:{k} float16", loss=loss)
                results[f"top-{k}, {mode}"] = {"top1": [r["test_top1"] for r in sel],
                                               "agree": [r["teacher_agreement"] for r in sel]}

        emit("")
        emit(f"student {args.student} test top-1 and agreement with the teacher (mean ± std over {len(seeds)} seeds):")
        emit("| targets | test top-1 | agreement |")
        emit("|---|---|---|")
        for label, v in results.items():
            emit(f"| {label} | {_mean_std(v['top1'])} | {_mean_std(v['agree'])} |")

        # 3. The losses themselves, at the full-logit student on the clean test split.
        c = Cache(caches["raw float16"])
        teacher_test = c.read_test_logits()
        model = create_model(args.student, c.num_classes, tuple(c.manifest["input"]["shape"]))
        model.load_state_dict(torch.load(work / "runs-full" / full_run["name"] / "student.pt",
                                         weights_only=False)["state_dict"])
        student = clean_test_logits(model, test, policy, c.manifest["input"]["mean"], c.manifest["input"]["std"],
                                    dev).float()
        t_dense = torch.from_numpy(teacher_test)

        def dense(s):
            return kl_sum(F.log_softmax(t_dense / T, -1), F.log_softmax(s / T, -1))

        s0 = student.clone().requires_grad_()
        dense(s0).mean().backward()
        g_dense = s0.grad.clone()
        emit("")
        emit(f"each loss at the trained full-logit student (seed 0) on the {len(test)} clean test images, T = {T:g}: "
             f"mean KL (dense KL {dense(student).mean().item():.4f}) and cosine of its gradient with the dense KL's:")
        emit("| k | rest kept | rest dropped | rest as zero | both renormalized |")
        emit("|---|---|---|---|---|")
        for k in ks:
            cols = fmt.encode_topk(teacher_test, k, temps)
            tk = TopKTargets(torch.from_numpy(cols["logits_topk_values"]),
                             torch.from_numpy(cols["logits_topk_indices"]), torch.from_numpy(cols["logits_topk_rest"]),
                             torch.tensor(temps))
            cells = []
            for mode in ("keep", "drop", "zero", "renormalize"):
                s = student.clone().requires_grad_()
                value = topk_kl(s, tk, T, mode).mean()
                value.backward()
                cos = F.cosine_similarity(s.grad.flatten(), g_dense.flatten(), dim=0).item()
                cells.append(f"{value.item():.4f} (cos {cos:.3f})")
            emit(f"| {k} | " + " | ".join(cells) + " |")
    emit(f"total {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
