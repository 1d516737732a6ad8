"""What weight sharing costs at run time: the SuperTransformer in a subnet's
mode against the extracted static SubTransformer of the same architecture.

Prints a table and writes JSON (``--out``). Forward = teacher-forced encoder +
decoder over one batch; medians of repeated runs, both models measured
alternately in the same process so machine noise hits both alike.

    python benchmarks/supernet_overhead.py --space tiny --out benchmarks/results/supernet_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import hatc
from hatc.cost import count_flops, count_params
from hatc.elastic.supernet import SuperTransformer
from hatc.space import load_space


def _time_ms(model, src, prev) -> float:
    start = time.perf_counter()
    model(src, prev)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    space = load_space(args.space)
    supernet = SuperTransformer(space, vocab_size=args.vocab).eval()
    src = torch.randint(4, args.vocab, (args.batch, args.length))
    prev = torch.randint(4, args.vocab, (args.batch, args.length))

    rows = []
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        supernet.set_active_subnet(arch)
        static = supernet.get_active_subnet().eval()
        with torch.no_grad():
            for _ in range(3):  # warm-up
                supernet(src, prev)
                static(src, prev)
            super_ms, static_ms = [], []
            for _ in range(args.repeats):  # interleaved so drift hits both
                super_ms.append(_time_ms(supernet, src, prev))
                static_ms.append(_time_ms(static, src, prev))
        rows.append(
            {
                "arch": name,
                "params_hat": count_params(arch, space),
                "params_total": sum(p.numel() for p in static.parameters()),
                "gflops": count_flops(arch, space) / 1e9,
                "supernet_forward_ms": statistics.median(super_ms),
                "static_forward_ms": statistics.median(static_ms),
            }
        )
        rows[-1]["supernet_over_static"] = rows[-1]["supernet_forward_ms"] / rows[-1]["static_forward_ms"]

    print(
        f"{'arch':9} {'params(HAT)':>12} {'params(all)':>12} {'GFLOPs':>7} "
        f"{'super ms':>9} {'static ms':>9} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['arch']:9} {r['params_hat'] / 1e6:11.2f}M {r['params_total'] / 1e6:11.2f}M {r['gflops']:7.3f} "
            f"{r['supernet_forward_ms']:9.2f} {r['static_forward_ms']:9.2f} {r['supernet_over_static']:6.2f}"
        )
    result = {
        "benchmark": "supernet_overhead",
        "space": space.name,
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "versions": {"hatc": hatc.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
