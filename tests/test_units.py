"""Binary units in everything fastfp8 prints: sizes, rates and progress bars agree."""

from __future__ import annotations

import io

from fastfp8.units import TQDM_BYTES, format_bytes, format_rate, parse_bytes


def test_format_rate_is_binary():
    assert format_rate(2**30) == "1.00 GiB/s"
    assert format_rate(36.6e9) == "34.09 GiB/s"  # 36.6 GB/s (decimal) is 34.09 GiB/s
    assert format_bytes(parse_bytes("5GiB")) == "5.00 GiB"
    assert format_bytes(parse_bytes("5GB")) == "4.66 GiB"


def test_progress_bar_counts_in_the_units_of_the_summary():
    from tqdm import tqdm

    buf = io.StringIO()
    bar = tqdm(total=3 * 2**30, file=buf, ascii=True, mininterval=0, **TQDM_BYTES)
    bar.update(3 * 2**30)
    bar.close()
    text = buf.getvalue()
    assert "3.00G/3.00G" in text  # 1024-based: the same 3.00 as format_bytes' "3.00 GiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
