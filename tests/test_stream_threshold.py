"""benchmarks/stream_threshold.py (streamed against cached stores), on a tiny case."""

import numpy as np

from cbn import functional as F


def test_measures_every_setting_and_restores_the_threshold(benchmark_script):
    script = benchmark_script("stream_threshold")
    before = F.STREAM_MIN_BYTES
    row = script.measure("16x8x3x3", "float32", cache_bytes=1 << 14, rounds=2, target_time=0.002)
    assert F.STREAM_MIN_BYTES == before
    assert row["shape"] == "16x8x3x3" and row["nbytes"] == 16 * 8 * 9 * 4
    for setting in script.SETTINGS:
        assert np.isfinite(row[setting]) and row[setting] > 0


def test_forward_gives_the_same_y_streamed_or_not(benchmark_script):
    """Streamed stores change where y is written from, not its bits (see test_streaming)."""
    script = benchmark_script("stream_threshold")
    rng = np.random.default_rng()
    x = rng.standard_normal((6, 5, 7)).astype(np.float32)
    a, b = np.empty_like(x), np.empty_like(x)
    script._forward(x, a, False, True)
    script._forward(x, b, True, False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, F.batch_norm_train(x)[0], rtol=0, atol=0)
