import argparse

import pytest

pytest.importorskip("torch")

from p2pkv.bench import save  # noqa: E402


def test_save_bench_runs_every_row_on_small_shapes_and_keeps_the_bytes():
    parser = argparse.ArgumentParser()
    save.add_args(parser)
    args = parser.parse_args(["--layers", "2", "--kv-heads", "1", "--head-size", "32",
                              "--block-size", "16", "--chunk-tokens", "64", "--chunks", "3",
                              "--reps", "1", "--scattered"])
    times = save.run(args)  # asserts copy_out wrote what the per-block copy writes
    lines = save.render(times, args.chunks)
    assert len(lines) == 1 + 9
    assert all(len(times[n][0]) == 3 for n in times if not n.startswith("_"))
