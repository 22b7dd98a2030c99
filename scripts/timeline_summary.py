#!/usr/bin/env python3
"""Set the processes' timelines side by side: where each spends a layer, and where it waits.

    QWEN_GPTQ_TIMELINE=/tmp/tl torchrun --nproc-per-node 2 -m qwen_gptq quantize ...
    python scripts/timeline_summary.py /tmp/tl.rank0.jsonl /tmp/tl.rank1.jsonl --layer 2

Each file holds one process's phase edges, stamped with the wall clock (runtime.timeline);
the processes of one host share that clock. For the layer asked (every layer without
--layer), one row per phase in the order the processes ran them, one column per process,
milliseconds: when the layer started (after the earliest process), the layer, each phase's
time (summed over its occurrences; nested phases count in their parents too), and the time
inside collectives, most of which is one process waiting for another. --nested names each
phase by the phases it is inside ("solve mlp.down_proj / results"), so that the steps of
different groups are not summed together. --json prints the same as one JSON object per
layer.
"""

import argparse
import json
import sys
from pathlib import Path

COLLECTIVES = ("agree", "all-reduce", "reduce-scatter", "broadcast header", "compare")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def layers(events: list[dict]) -> dict[int, list[dict]]:
    """Each layer's events (its own edges included), by layer number."""
    out: dict[int, list[dict]] = {}
    current = None
    for e in events:
        if e["phase"].startswith("layer ") and e["edge"] == "in":
            current = int(e["phase"].split()[1])
            out[current] = []
        if current is not None:
            out[current].append(e)
        if e["phase"].startswith("layer ") and e["edge"] == "out":
            current = None
    return out


def summary(per_rank: list[list[dict]], nested: bool = False) -> dict:
    """One layer's events of each process -> {"start", "layer", "collectives": ms per
    process, "phases": {phase: ms per process}}. nested: a phase inside others is named by
    its path ("solve mlp.down_proj / results"), not summed with its namesakes elsewhere."""
    starts = [ev[0]["t"] for ev in per_rank]
    first = min(starts)
    phases: dict[str, list[float]] = {}
    waits, totals = [], []
    for r, ev in enumerate(per_rank):
        opened: dict[str, list[float]] = {}
        path: list[str] = []  # the phases open now, outermost first (the layer's own left out)
        waited = 0.0
        for e in ev:
            name = e["phase"]
            collective = name in COLLECTIVES
            if nested and not name.startswith("layer "):
                if e["edge"] == "in":
                    path.append(name)
                    name = " / ".join(path)
                else:
                    name = " / ".join(path)
                    path.pop()
            if e["edge"] == "in":
                opened.setdefault(name, []).append(e["t"])
                if not name.startswith("layer "):
                    phases.setdefault(name, [0.0] * len(per_rank))  # (rows in the order phases start)
                continue
            took = 1000 * (e["t"] - opened[name].pop())
            if name.startswith("layer "):
                totals.append(took)
                continue
            phases[name][r] += took
            if collective:
                waited += took
        waits.append(waited)
    return {"start": [1000 * (s - first) for s in starts], "layer": totals, "collectives": waits, "phases": phases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="FILE.rankN.jsonl, one per process, in rank order")
    p.add_argument("--layer", type=int, help="only this layer")
    p.add_argument("--nested", action="store_true", help="name each phase by the phases it is inside")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    per_file = [layers(read(f)) for f in a.files]
    common = sorted(set.intersection(*(set(x) for x in per_file)))
    if a.layer is not None:
        if a.layer not in common:
            sys.exit(f"layer {a.layer} is not in every file (they share layers {common})")
        common = [a.layer]
    for i in common:
        s = summary([x[i] for x in per_file], a.nested)
        if a.json:
            print(json.dumps({"layer_index": i, **s}))
            continue
        rows = [("started after the first", s["start"]), ("layer", s["layer"]),
                ("in collectives (waiting)", s["collectives"]), *s["phases"].items()]
        width = max(34, *(len(name) for name, _ in rows))
        head = "".join(f"{f'process {r}':>12}" for r in range(len(a.files)))
        print(f"{f'layer {i} (ms)':<{width + 2}}{head}")
        for name, values in rows:
            print(f"  {name:<{width}}" + "".join(f"{v:12.1f}" for v in values))


if __name__ == "__main__":
    main()
