"""``python -m convlens_zeiler_fergus ARGS`` is ``convlens recipe zeiler-fergus ARGS``; it is the
form ``torchrun`` launches:

    torchrun --standalone --nproc_per_node=8 -m convlens_zeiler_fergus --data /data/imagenet
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m convlens_zeiler_fergus --data /data/imagenet --out /shared/runs/zf
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from convlens.cli import main as convlens_main

    args = list(sys.argv[1:] if argv is None else argv)
    return convlens_main(["recipe", "zeiler-fergus", *args]) or 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
