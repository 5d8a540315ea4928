"""Where a process spent its samples: a summary of py-spy's collapsed stacks.

``py-spy record --pid PID --threads --format raw -o stacks.txt`` writes one line per distinct
stack, ``thread (TID): NAME;frame;frame;... COUNT``. This prints each thread's share of the
samples, the frames that were on top (where the time went) and the frames that were anywhere
on the stack (which calls it went under)::

    python -m benchmarks.stack_summary stacks.txt --rate 250 --seconds 8 --top 20 \
        --match 'segmentation|multipart|pickle|grpc'

With ``--rate`` and ``--seconds`` (those of the recording) it also says how many cores the
process used while sampled: samples / (rate x seconds), idle threads not counted (py-spy
leaves them out unless told ``--idle``).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Summary:
    samples: int = 0
    threads: Counter[str] = field(default_factory=Counter)
    top: Counter[tuple[str, str]] = field(default_factory=Counter)
    anywhere: Counter[tuple[str, str]] = field(default_factory=Counter)


def _thread_name(head: str) -> str:
    """``thread (9903): AsyncIO Thread: default`` -> ``AsyncIO Thread: default``; numbered
    pool threads keep their pool's name only (``codec_3`` -> ``codec_*``)."""
    name = head.split(": ", 1)[1] if ": " in head else head
    return re.sub(r"_\d+$", "_*", name)


def summarise(lines: list[str]) -> Summary:
    """The counts of py-spy's raw (collapsed) lines; threads of one pool are counted together."""
    summary = Summary()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        head, *frames = stack.split(";")
        thread = _thread_name(head)
        summary.samples += samples
        summary.threads[thread] += samples
        if frames:
            summary.top[(thread, frames[-1])] += samples
        for frame in set(frames):
            summary.anywhere[(thread, frame)] += samples
    return summary


def report(summary: Summary, top: int, cores_over: float | None = None, match: str = "") -> str:
    """The summary as text; ``match`` (a regular expression) keeps the frames of the
    "anywhere" section that it finds (e.g. the project's own modules)."""
    total = max(1, summary.samples)
    anywhere = Counter({k: n for k, n in summary.anywhere.items() if re.search(match, k[1])})
    out = [f"samples: {summary.samples}"]
    if cores_over:
        out[0] += f" ({summary.samples / cores_over:.2f} cores while sampled)"
    out.append("threads:")
    out += [f"  {n / total:6.1%}  {name}" for name, n in summary.threads.most_common(top)]
    for title, counts in (("on top:", summary.top), ("anywhere on the stack:", anywhere)):
        out.append(title)
        out += [f"  {n / total:6.1%}  [{t}] {frame}" for (t, frame), n in counts.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path, nargs="+", help="py-spy --format raw files")
    parser.add_argument("--top", type=int, default=20, help="lines per section")
    parser.add_argument("--rate", type=float, default=None, help="samples per second recorded")
    parser.add_argument("--seconds", type=float, default=None, help="seconds recorded")
    parser.add_argument("--match", default="", help="regex: 'anywhere' frames to keep")
    args = parser.parse_args(argv)
    cores_over = args.rate * args.seconds if args.rate and args.seconds else None
    for path in args.stacks:
        print(f"== {path}")
        print(report(summarise(path.read_text().splitlines()), args.top, cores_over, args.match))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
