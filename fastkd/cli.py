"""The ``fastkd`` command line: ``fastkd demo`` distils a student on scikit-learn's digits and compares it with
the same student trained from scratch; ``fastkd bench`` times fastkd's ops (kd_loss, linear_kd_loss, feature_loss,
spectral norms) against torch eager, torch.compile, Liger-Kernel (when installed) or a per-layer loop, on this
machine; ``fastkd cache-teacher`` runs a teacher the user names over their batches into a
:class:`fastkd.TeacherCache`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time fastkd's ops against the usual baselines")
    bench.add_argument(
        "--op",
        choices=["kd", "overhead", "linear", "feature", "lipschitz", "topk", "relational", "all"],
        default="kd",
        help="kd: kd_loss; overhead: kd_loss per call at classification shapes; linear: linear_kd_loss from hidden "
        "states and heads; feature: feature_loss; lipschitz: spectral norms of ResNet-18's weights; topk: kd_loss "
        "with a TopK teacher, C++ vs the reference; relational: RKD and CRD vs their eager formulations; all: each "
        "with its default shapes (default kd)",
    )
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    bench.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE[:DTYPE]",
        help="kd: ROWSxVOCAB (8192x32000:bf16); topk: ROWSxVOCABxK (2048x32000x64); linear: ROWSxHIDDENxVOCAB "
        "(8192x4096x128256:bf16); feature: "
        "NxCxHxW (256x256x28x28:bf16); lipschitz: "
        "resnet18[:bf16]; dtype fp32, fp16 or bf16; default: a few shapes sized for the device",
    )
    bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="dtype of the shapes that name none")
    bench.add_argument("--temperature", type=float, default=4.0)
    bench.add_argument("--reps", type=int, default=20, help="timed repeats per measurement (CPU; ×10 ms on CUDA)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    bench.add_argument("--plot", metavar="PATH", help="also save a figure (PNG/PDF/SVG by extension; needs matplotlib)")
    demo = commands.add_parser("demo", help="distil a student on the digits dataset vs the same student from scratch")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    demo.add_argument(
        "--seeds", type=int, help="independent runs averaged in the table (default 5; 3 with --suite seeds)"
    )
    demo.add_argument("--epochs", type=int, help="epochs of every model (default: 300 teacher, 500 students)")
    demo.add_argument("--temperature", type=float, help="KD temperature T (default 2)")
    demo.add_argument("--alpha", type=float, help="weight α of the KD term, 1 − α of the cross-entropy (default 0.9)")
    demo.add_argument("--json", metavar="PATH", help="also write every run's figures as JSON")
    demo.add_argument(
        "--suite",
        choices=["seeds"],
        help="seeds: every method this project grew from, one row each (fastkd.demo_suite; several minutes)",
    )
    demo.add_argument("--method", nargs="+", metavar="NAME", help="with --suite seeds: only these methods")
    cache = commands.add_parser(
        "cache-teacher",
        help="run a teacher over a dataset once and keep its sparse outputs on disk (fastkd.TeacherCache)",
    )
    cache.add_argument("--teacher", required=True, metavar="MODULE:CALLABLE", help="returns the teacher model")
    cache.add_argument(
        "--data",
        required=True,
        metavar="MODULE:CALLABLE",
        help="returns an iterable of dict batches: sample ids under --id-key, the model's keyword inputs, "
        "attention_mask (the tokens kept)",
    )
    cache.add_argument("--out", required=True, help="the cache directory")
    cache.add_argument("--k", type=int, default=64, help="entries per token (default 64)")
    cache.add_argument("--kind", choices=["topk", "sampled"], default="topk")
    cache.add_argument("--top-p", type=float, help="kind topk: keep each token's top-p prefix (ragged)")
    cache.add_argument("--temperature", type=float, default=1.0, help="of the stored distribution (default 1)")
    cache.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16", help="kind topk: of the values")
    cache.add_argument("--seed", type=int, default=0, help="kind sampled: seed of the draws")
    cache.add_argument("--id-key", default="id", help="the batch key of the sample ids (default id)")
    cache.add_argument("--device", help="torch device to run the teacher on (default: where it is)")
    cache.add_argument("--resume", action="store_true", help="continue an interrupted cache")
    args = parser.parse_args(argv)

    if args.command == "demo":
        return _demo(parser, args)
    if args.command == "cache-teacher":
        return _cache_teacher(parser, args)
    from . import bench as harness  # imports torch only once the arguments are known to be good

    if args.op == "relational":
        from . import bench_relational

        bench_relational.run(args.device, reps=min(args.reps, 5), json_path=args.json)
        return 0
    try:
        harness.run(
            args.shapes,
            op=args.op,
            device=args.device,
            temperature=args.temperature,
            reps=args.reps,
            dtype=args.dtype,
            json_path=args.json,
            plot_path=args.plot,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return 0


def _demo(parser: argparse.ArgumentParser, args) -> int:
    import dataclasses

    from . import demo

    if args.method and not args.suite:
        parser.error("--method picks methods of --suite seeds")
    if args.suite:
        from . import demo_suite

        try:
            demo_suite.run_suite(
                tuple(args.method or demo_suite.METHODS),
                seeds=3 if args.seeds is None else args.seeds,
                epochs=args.epochs,
                device=args.device,
                json_path=args.json,
            )
        except ValueError as exc:
            parser.error(str(exc))
        return 0

    chosen = {
        name: value for name, value in (("temperature", args.temperature), ("alpha", args.alpha)) if value is not None
    }
    try:
        demo.run(
            seeds=5 if args.seeds is None else args.seeds,
            epochs=args.epochs,
            device=args.device,
            json_path=args.json,
            settings=dataclasses.replace(demo.Settings(), **chosen),
        )
    except ValueError as exc:
        parser.error(str(exc))
    return 0


def _entry_point(parser: argparse.ArgumentParser, name: str, spec: str):
    """The object ``module:attribute`` names (the current directory importable)."""
    import importlib
    import os

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        parser.error(f"{name} must be MODULE:CALLABLE, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        parser.error(f"{name} {spec!r} cannot be loaded: {exc}")


def _cache_teacher(parser: argparse.ArgumentParser, args) -> int:
    import torch

    from .teacher_cache import write_teacher

    teacher = _entry_point(parser, "--teacher", args.teacher)()
    batches = _entry_point(parser, "--data", args.data)()
    if args.device is not None:
        teacher = teacher.to(args.device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        written = write_teacher(
            args.out,
            teacher.eval() if isinstance(teacher, torch.nn.Module) else teacher,
            batches,
            id_key=args.id_key,
            device=args.device,
            k=args.k,
            kind=args.kind,
            top_p=args.top_p,
            temperature=args.temperature,
            dtype=dtypes[args.dtype],
            seed=args.seed,
            resume=args.resume,
        )
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
    print(f"cached {written} batches in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
