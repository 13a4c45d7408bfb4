"""Soak (issue 22): many streaming clients for minutes against a real `loraserve serve` subprocess.

    python benchmarks/soak.py [--clients 256] [--minutes 5] [--out benchmarks/results/soak.json]

The sharp tiny Llama of the server tests with 7 PEFT adapters served (--max-loras 2, --max-cpu-loras 3: more
adapters than slots and host copies), float32 in the server and in the offline reference so greedy outputs
compare exactly. Each client loops over seeded random (prompt, model) picks among the base, the 7 adapters and
the newest churned name, streams 32 greedy tokens and either reads to the end, the text then checked against
the offline `LLM`'s, or (30 %) hangs up after a random number of chunks. Beside them, one adapter update per
second: an extra adapter loaded under a fresh name, a served name reloaded in place from its same folder, the
extra name unloaded (requests racing that unload get 404: counted as refused). The server's resident memory
(loraserve_resident_memory_bytes) is sampled every few seconds; once the server is idle, what it still holds
is read from /metrics. The driver and its checks are tests/test_soak.py's (its test is the shortened run).
Prints the figures, writes them to --out, exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_soak import SoakSettings, figures, problems, run_soak  # the test's own driver

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="RSS slope fitted after this")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="draw the server's resident memory over the run (needs matplotlib: .[bench])")
    parser.add_argument("--replot", action="store_true", help="only draw --plot from the existing --out")
    args = parser.parse_args()
    if args.replot:
        draw(json.loads(args.out.read_text()), args.plot)
        return 0
    settings = SoakSettings(clients=args.clients, seconds=args.minutes * 60, warmup_seconds=args.warmup_minutes * 60)
    with tempfile.TemporaryDirectory(prefix="soak-") as root:
        result = run_soak(settings, Path(root))
        found = problems(result)
        if found:
            print((Path(root) / "server.log").read_text(errors="replace")[-3000:])
    print(figures(result))
    print("\n".join(["checks failed:", *found]) if found else "checks: all passed")
    args.out.write_text(json.dumps(result | {"problems": found}, indent=1))
    print(f"wrote {args.out}")
    if args.plot is not None:
        draw(result, args.plot)
    return 1 if found else 0


def draw(result: dict, png: Path) -> None:
    """RSS over the run, the warm-up shaded, the fitted post-warm-up slope drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rss, warmup = result["rss"], result["settings"]["warmup_seconds"]
    seconds, mib = zip(*rss["samples"], strict=True)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(seconds, mib, marker=".", lw=1, label="server RSS")
    ax.axvspan(0, warmup, color="0.9", label="warm-up")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(mib) * 1.15)
    ax.set_title(f"soak: {result['settings']['clients']} streaming clients, {result['completed']} completed, "
                 f"slope {rss['slope_mib_per_min']:+.2f} MiB/min after warm-up", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
