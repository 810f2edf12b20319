"""Sabotage checks: break actpat on purpose and confirm that the test suite notices.

    .venv/bin/python tests/sabotage.py            # every sabotage, each with a clean control run
    .venv/bin/python tests/sabotage.py --only metric-abs --no-control

Each sabotage edits one line of a *temporary copy* of the repository (the package, the tests and
the benchmarks), then runs the tests that should catch it against that copy and reports
``caught`` (some test failed or errored) or ``NOT CAUGHT``. The control run (the same tests on
an unedited copy) must pass, or a "caught" would mean nothing.

The copy is run by a throw-away virtual environment made here: it sees the packages of the
interpreter running this script (a ``.pth`` line naming its site-packages folders) but not the
editable install of actpat, so ``import actpat`` (also in child processes the tests start)
imports the copy. Nothing outside the temporary folder is written. Exit status 0 when every
sabotage is caught and every control passes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sabotage:
    name: str
    what: str
    pattern: str  # regex (MULTILINE), must match exactly once in exactly one file of actpat/
    replace: str
    tests: list[str]
    env: dict = field(default_factory=dict)


SABOTAGES = [
    Sabotage("gguf-load-ci", "from_pretrained of a GGUF raises (real model loading broken); "
             "CI=true",
             r"^(\s*)(model = AutoModelForCausalLM\.from_pretrained\([^\n]*gguf_file=)",
             r"\1raise RuntimeError('sabotage: GGUF loading broken')\n\1\2",
             ["tests/test_models.py::test_gguf_cache_reload_matches_the_dequantised_gguf",
              "tests/test_metric.py::test_smollm2_batched_equals_autograd"],
             {"CI": "true"}),
    Sabotage("gguf-load", "the same, without CI (no skip either: a loader error fails)",
             r"^(\s*)(model = AutoModelForCausalLM\.from_pretrained\([^\n]*gguf_file=)",
             r"\1raise RuntimeError('sabotage: GGUF loading broken')\n\1\2",
             ["tests/test_models.py::test_gguf_cache_reload_matches_the_dequantised_gguf"],
             {"CI": ""}),
    Sabotage("metric-abs", "the metric's absolute values removed (W * G instead of |W * G|)",
             r"(grad = torch\.bmm\(g\.transpose\(1, 2\), x\))\.abs_\(\)(.*\n(?:.*\n){0,3}?\s*"
             r"w_abs = w\.float\(\))\.abs\(\)",
             r"\1\2",
             ["tests/test_metric.py", "-k", "not smollm2"]),
    Sabotage("wanda-magnitude", "Wanda's score |W| * ||X|| replaced by the magnitude |W|",
             r"return weight\.abs\(\) \* sumsq\.to\(weight\.dtype\)\.sqrt\(\)\.unsqueeze\(0\)",
             "return weight.abs()",
             ["tests/test_pruning.py", "-k", "wanda_equals or wanda_nm"]),
    Sabotage("conv1d-layout", "ScoredMatrix.weight ignores GPT-2's (in, out) storage",
             r"return w\.t\(\) if self\.transposed else w", "return w",
             ["tests/test_models.py", "-k", "adapter"]),
    Sabotage("no-fix-mean", "allocate() returns the allocator's numbers without fix_mean "
             "(no clipping into [0, 0.999])",
             r"return fix_mean\(out, sparsity, layer_sizes\)", "return [float(x) for x in out]",
             ["tests/test_allocation.py", "-k", "formula or invariants"]),
]


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for part in ("actpat", "tests", "benchmarks"):
        if (REPO / part).exists():
            shutil.copytree(REPO / part, dest / part, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        if (REPO / f).exists():
            shutil.copy2(REPO / f, dest / f)
    return dest


def apply(sab: Sabotage, root: Path) -> Path:
    hits = []
    for f in sorted((root / "actpat").rglob("*.py")):
        text = f.read_text()
        n = len(re.findall(sab.pattern, text, flags=re.MULTILINE))
        if n:
            hits.append((f, n, text))
    if len(hits) != 1 or hits[0][1] != 1:
        raise SystemExit(f"sabotage {sab.name}: pattern found {[(str(h[0]), h[1]) for h in hits]}"
                         " (needs exactly one place); update tests/sabotage.py")
    f, _, text = hits[0]
    f.write_text(re.sub(sab.pattern, sab.replace, text, count=1, flags=re.MULTILINE))
    return f


def shadow_python(where: Path) -> Path:
    """A venv whose python sees this interpreter's packages but not the editable actpat."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    dirs = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
            if Path(p).is_dir()]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    # plain path lines: the folders join sys.path, their own .pth files (the editable finder of
    # actpat among them) are not run
    (Path(purelib) / "actpat_sabotage_deps.pth").write_text("\n".join(dict.fromkeys(dirs)) + "\n")
    return py


def run_tests(py: Path, root: Path, tests: list[str], env_extra: dict) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    for k, v in env_extra.items():
        if v:
            env[k] = v
        else:
            env.pop(k, None)
    check = subprocess.run([str(py), "-c", "import actpat; print(actpat.__file__)"], env=env,
                           cwd=root, capture_output=True, text=True)
    if not check.stdout.strip().startswith(str(root)):
        raise SystemExit(f"the copy is not what gets imported: {check.stdout}{check.stderr}")
    start = time.time()
    proc = subprocess.run([str(py), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           *tests], env=env, cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else proc.stderr[-300:]), time.time() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated sabotage names")
    p.add_argument("--no-control", action="store_true", help="skip the clean control runs")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    chosen = SABOTAGES
    if args.only:
        names = args.only.split(",")
        chosen = [s for s in SABOTAGES if s.name in names]
        if len(chosen) != len(names):
            raise SystemExit(f"unknown sabotage in {names}; use --list")
    if args.list:
        for s in SABOTAGES:
            print(f"{s.name:<16} {s.what}")
        return 0
    all_good = True
    with tempfile.TemporaryDirectory(prefix="actpat-sabotage-") as tmp:
        tmp = Path(tmp)
        py = shadow_python(tmp / "venv")
        rows = []
        for sab in chosen:
            control = None
            if not args.no_control:
                clean = copy_repo(tmp / f"{sab.name}-clean")
                rc, summary, secs = run_tests(py, clean, sab.tests, sab.env)
                control = (rc == 0 and "skipped" not in summary, summary, secs)
            root = copy_repo(tmp / sab.name)
            changed = apply(sab, root)
            rc, summary, secs = run_tests(py, root, sab.tests, sab.env)
            caught = rc != 0 and ("failed" in summary or "error" in summary)
            all_good &= caught and (control is None or control[0])
            rows.append((sab, changed.relative_to(root), caught, summary, secs, control))
            print(f"{sab.name:<16} {'caught' if caught else 'NOT CAUGHT':<10} "
                  f"({summary}; {secs:.0f}s)"
                  + ("" if control is None else
                     f"; control {'passed' if control[0] else 'FAILED'} ({control[1]})"),
                  flush=True)
    print()
    print("| sabotage | edit | tests | result | control |")
    print("| --- | --- | --- | --- | --- |")
    for sab, changed, caught, summary, secs, control in rows:
        ctl = "-" if control is None else ("passed" if control[0] else f"FAILED: {control[1]}")
        cells = [sab.name, f"{sab.what} ({changed})", f"`{' '.join(sab.tests)}`",
                 f"{'caught' if caught else 'NOT CAUGHT'}: {summary}", ctl]
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
