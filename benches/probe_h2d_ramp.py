"""How fast host-to-device copies run in their first milliseconds, by what came before.

1 GiB copied in 8 MiB pieces from a 128 MiB pinned ring (as the loader's ring), an event
after each piece; GB/s in the first 5, 5 - 10, 10 - 20 and 20 - 40 ms, by condition (round
robin, ``--repeat`` rounds):

- ``fresh``: torch's cache emptied (its device memory freed), a pause, a new 2 GiB output;
- ``fresh_nosleep``: the same without the pause (what a benchmark that empties the cache
  right before each timed load does);
- ``touched``: as ``fresh``, the output written once before the copies;
- ``reused`` / ``reused_nosleep``: an output allocated and written long before;
- ``spin``: the GPU kept busy for 10 ms first (its clocks up).

On an H200 (session 17, ``results/logs/probe_h2d_ramp_h200_session17.json``) only
``fresh_nosleep`` was slow: 22 - 24 GB/s in the first 5 ms, 34 - 35 in the next 5, against
52 - 54 for every other condition. ``bench_load.py --settle-s`` pauses after emptying the
cache for that reason.

    python benches/probe_h2d_ramp.py --out $OUT/probe_h2d_ramp.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GiB = 1 << 30
PIECE = 8 << 20
CONDITIONS = ("fresh", "fresh_nosleep", "touched", "reused", "reused_nosleep", "spin")


def copy_profile(ring: torch.Tensor, dst: torch.Tensor, nbytes: int = GiB) -> dict[str, float]:
    """GB/s of ``nbytes`` copied from ``ring`` (cycled) into ``dst``, overall and by window."""
    stream = torch.cuda.Stream()
    events = []
    start = torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        for i in range(nbytes // PIECE):
            off = (i * PIECE) % ring.numel()
            dst[i * PIECE : (i + 1) * PIECE].copy_(ring[off : off + PIECE], non_blocking=True)
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append(e)
    torch.cuda.synchronize()
    done = [start.elapsed_time(e) for e in events]  # ms
    out = {"total_gbps": nbytes / done[-1] / 1e6}
    for lo, hi in ((0, 5), (5, 10), (10, 20), (20, 40)):
        n = sum(1 for x in done if lo < x <= hi)
        out[f"gbps_{lo}_{hi}ms"] = round(n * PIECE / (hi - lo) / 1e6, 1)
    out["ms_first_8_pieces"] = round(done[7], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="probe_h2d_ramp.json")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--pause-s", type=float, default=0.2, help="the pause of the conditions that have one")
    args = ap.parse_args()
    dev = torch.device("cuda")
    ring = torch.empty(128 << 20, dtype=torch.uint8, pin_memory=True).fill_(1)
    kept = torch.zeros(GiB, dtype=torch.uint8, device=dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def run(name: str) -> dict[str, float]:
        fresh = name.startswith("fresh") or name == "touched"
        if fresh:
            torch.cuda.empty_cache()
        if "nosleep" not in name:
            time.sleep(args.pause_s)
        if name == "spin":
            t = time.perf_counter()
            while time.perf_counter() - t < 0.01:
                a @ a
            torch.cuda.synchronize()
        dst = torch.empty(2 * GiB, dtype=torch.uint8, device=dev) if fresh else kept
        if name == "touched":
            dst.zero_()
            torch.cuda.synchronize()
        return copy_profile(ring, dst)

    for name in CONDITIONS:  # warm-up
        run(name)
    res: dict[str, list[dict]] = {name: [] for name in CONDITIONS}
    for _ in range(args.repeat):
        for name in CONDITIONS:
            res[name].append(run(name))
    for name in CONDITIONS:
        first = " | ".join(f"{r['gbps_0_5ms']:.0f}/{r['gbps_5_10ms']:.0f}/{r['total_gbps']:.1f}" for r in res[name])
        print(f"{name:16s} GB/s in 0-5 ms / 5-10 ms / overall, by round: {first}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "rounds": res}, f, indent=1)


if __name__ == "__main__":
    main()
