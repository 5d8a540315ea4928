"""py-spy's collapsed stacks summarised: thread shares, frames on top and anywhere."""

from benchmarks.stack_summary import report, summarise

LINES = [
    "thread (11): AsyncIO Thread: default;run (a.py:1);parse (m.py:5) 30",
    "thread (11): AsyncIO Thread: default;run (a.py:1);send (s.py:9);dump (p.py:2) 10",
    "thread (21): codec_0;work (t.py:3);png (e.py:7) 40",
    "thread (22): codec_1;work (t.py:3);png (e.py:7) 20",
    "not a stack line",
]


def test_counts_threads_of_a_pool_together_and_each_frame_once_per_stack() -> None:
    summary = summarise(LINES)
    assert summary.samples == 100
    assert summary.threads == {"AsyncIO Thread: default": 40, "codec_*": 60}
    assert summary.top[("codec_*", "png (e.py:7)")] == 60
    assert summary.top[("AsyncIO Thread: default", "dump (p.py:2)")] == 10
    assert summary.anywhere[("AsyncIO Thread: default", "run (a.py:1)")] == 40


def test_report_gives_shares_cores_and_keeps_matching_frames() -> None:
    text = report(summarise(LINES), top=5, cores_over=50.0, match=r"p\.py|m\.py")
    assert "samples: 100 (2.00 cores while sampled)" in text
    assert "60.0%  codec_*" in text
    anywhere = text.split("anywhere on the stack:")[1]
    assert "30.0%  [AsyncIO Thread: default] parse (m.py:5)" in anywhere
    assert "run (a.py:1)" not in anywhere and "png" not in anywhere
