"""The ``fastkd`` command line: ``fastkd bench`` times kd_loss against torch eager, torch.compile and
Liger-Kernel (when installed) on this machine."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time kd_loss forward+backward against the usual baselines")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    bench.add_argument("--shapes", nargs="+", metavar="NxV[:DTYPE]",
                       help="e.g. 8192x32000:bf16 (dtype fp32, fp16 or bf16; default fp32); "
                            "default: a few shapes sized for the device")
    bench.add_argument("--temperature", type=float, default=4.0)
    bench.add_argument("--reps", type=int, default=20, help="timed repeats per measurement (CPU; ×10 ms on CUDA)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    from . import bench as harness  # imports torch only once the arguments are known to be good
    try:
        harness.run(args.shapes, device=args.device, temperature=args.temperature, reps=args.reps,
                    json_path=args.json)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
