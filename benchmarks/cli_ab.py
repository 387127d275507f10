"""A/B of the command's whole wall clock: ``convlens probe occlusion`` at an earlier revision and at
this working tree, alternating, on the same machine in one run.

    .venv/bin/python benchmarks/cli_ab.py --before 0afad94 --repeats 4

Each repeat runs, for each tree in turn, a *first* run (a new, empty convlens cache folder: panel
(c)'s deconv rule is measured) and a *later* run (the same cache). The earlier revision is checked
out into a temporary ``git worktree`` and imported ahead of the installed package
(``PYTHONPATH``); both use this environment's packages. Printed: the median wall clock and the
median CPU time (user + system, of the child process) of each, and every sample. Nothing is
subtracted: interpreter, imports, model creation and exit are all included, as a user sees them.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(root: Path, args: list[str], cache: str) -> tuple[float, float]:
    env = dict(os.environ, CONVLENS_NO_PROGRESS="1", PYTHONWARNINGS="ignore", CONVLENS_CACHE=cache,
               PYTHONPATH=os.pathsep.join(str(root / p) for p in ("", "plugins", "recipes")))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "convlens", *args, "--out", out], env=env,
                       check=True, capture_output=True, cwd=tempfile.gettempdir())  # fmt: skip
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--target", type=int, default=7)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from convlens.data import sample

    probe = ["probe", "occlusion", "--model", a.model, "--images", str(sample("coffee").path),
             "--window", str(a.window), "--stride", str(a.stride), "--target", str(a.target)]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="convlens-ab-"))
    old = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old),
                    a.before], check=True)  # fmt: skip
    trees = {f"before ({a.before})": old, "this tree": ROOT}
    res = {k: {"first": [], "later": []} for k in trees}
    try:
        for r in range(a.repeats):
            for name, root in trees.items():
                cache = tempfile.mkdtemp(prefix="convlens-ab-cache-")
                for kind in ("first", "later"):
                    res[name][kind].append(run_once(root, probe, cache))
                shutil.rmtree(cache, ignore_errors=True)
            print(f"repeat {r + 1}: " + "; ".join(
                f"{n} first {v['first'][-1][0]:.2f} s, later {v['later'][-1][0]:.2f} s"
                for n, v in res.items()
            ), flush=True)  # fmt: skip
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    print(f"convlens {' '.join(probe)} ({a.repeats} repeats, alternating)")
    for name, v in res.items():
        med = {k: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
               for k, s in v.items()}  # fmt: skip
        print(f"{name}: first run {med['first'][0]:.2f} s wall, {med['first'][1]:.2f} s CPU; "
              f"later runs {med['later'][0]:.2f} s wall, {med['later'][1]:.2f} s CPU")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
