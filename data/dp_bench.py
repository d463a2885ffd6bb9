"""Data-parallel scaling on this machine: the same short sft run on the default model in one process and in N
processes (`mlx.launch --backend ring`, MLX's own distributed layer), their tokens per second, the scaling
efficiency (N-process tok/s / (N x one-process tok/s)) and how far apart their adapters end.

    python data/dp_bench.py [--processes 2] [--steps 6] [--batch-size 4] [--out runs/bench-dp]    # make bench-dp

Both runs train the same global batch (--batch-size), so they should end with the same adapters to float
tolerance. The first report window (--log-every steps: traces, warm caches) is left out of the rate. Each of
the N processes gets cores / N BLAS threads, so that together they use the cores one process would.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(out, processes, args):
    """One training run; -> its report row: processes, BLAS threads each, tok/s after the first window, seconds."""
    command = [sys.executable, str(ROOT / "clara.py"), "sft", "--data", str(ROOT / "data" / "sft.jsonl"), *args.clara,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--log-every", str(args.log_every),
               "--eval-every", "100000", "--save-every", "100000", "--out", str(out), "--overwrite"]
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if processes > 1:
        command = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(processes), "--backend", "ring",
                   "--python", sys.executable, *command[1:]]
    tic = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - tic
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["kind"] == "train" and r["step"] > args.log_every]
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in timed)
    return {"processes": processes, "blas_threads": threads, "tokens_per_s": tokens / sum(r["seconds"] for r in timed),
            "process_seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--log-every", type=int, default=2, help="report window; the first one is not timed")
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch of both runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-dp")
    parser.add_argument("--clara", nargs=argparse.REMAINDER, default=[], help="further clara.py sft options (last)")
    args = parser.parse_args()
    import clara
    import mlx.core as mx

    one, many = run(args.out / "one", 1, args), run(args.out / f"{args.processes}", args.processes, args)
    a, b = (clara.read_trained(args.out / name)[1] for name in ("one", f"{args.processes}"))
    apart = max(mx.abs(a[k] - b[k]).max().item() for k in a)
    report = {"machine": f"{os.cpu_count()} cores, BLAS: {clara.BLAS}", "batch_size": args.batch_size,
              "steps": args.steps, "rows": [one, many],
              "efficiency": many["tokens_per_s"] / (args.processes * one["tokens_per_s"]),
              "adapters_max_abs_difference": apart}
    (args.out / "bench-dp.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| processes | BLAS threads each | tok/s | whole run s |\n|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['processes']} | {row['blas_threads']} | {row['tokens_per_s']:.0f} | "
              f"{row['process_seconds']:.1f} |")
    print(f"{report['machine']}; global batch {args.batch_size}, {args.steps} steps; speed-up "
          f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}x, scaling efficiency {report['efficiency']:.2f}; "
          f"adapters at most {apart:.1e} apart")


if __name__ == "__main__":
    main()
