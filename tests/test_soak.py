"""A short soak in the default suite; `nox -s soak` runs it for ten minutes."""

from __future__ import annotations

from .soak import soak


async def test_a_short_soak_drains_everything_and_leaks_nothing() -> None:
    report = await soak(12.0, rate=1000)
    assert report["samples"] >= 10
    assert report["retried"] > 0, "the broker's faults should have caused retries"
