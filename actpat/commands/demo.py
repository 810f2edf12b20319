"""actpat demo: the paper's pipeline end to end on SmolLM2-135M, offline (what `make demo` runs)."""

from __future__ import annotations

from .common import add_common

HELP = ("the paper's pipeline end to end (profiles, Figure 1, similarity, STS, allocation, "
        "Wanda 50%%, evaluation, HTML report); resumes")


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, .gguf path, directory or hub id (default smollm2-135m)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes)")
    p.add_argument("--only", default=None,
                   help="comma-separated steps to run (profiles, figure1, relatedness, "
                        "similarity, sts, allocation, prune, eval, report)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_common(p)


def run(args) -> int:
    from ..experiments.demo import STEPS, run_demo
    from ..errors import UserError

    only = None
    if args.only:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in only if s not in {x.name for x in STEPS}]
        if unknown:
            raise UserError(f"unknown step '{unknown[0]}' in --only: use any of "
                            f"{', '.join(x.name for x in STEPS)}")
    state = run_demo(args.out, args.model, args.quick, args.data_dir, args.seed, args.device,
                     args.quiet, args.overwrite, only)
    failed = [k for k, v in state["steps"].items() if v.get("status") == "failed"]
    return 1 if failed else 0
