"""Side-by-side table of training-step records (JSON lines of workload.record), with each
implementation's tokens/s as a ratio to the first one's.

    python benchmarks/peer/table.py results.jsonl
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip().startswith("{")]
    if not rows:
        sys.exit(f"{path}: no result lines")
    base = rows[0]["tokens_per_s"]
    print("| impl | params | s/step (median) | tokens/s | vs first | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['params'] / 1e6:.1f}M | {r['step_s_median']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['peak_rss_mib']:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
