"""Rate limits per key: each key its own bucket, memory bounded."""

from __future__ import annotations

from fieldsync.rates import PerKey


def test_each_address_has_its_own_bucket() -> None:
    limits = PerKey(rate=0.001, burst=2)
    assert [limits.take("10.0.0.1") for _ in range(2)] == [0, 0]
    assert limits.take("10.0.0.1") >= 1  # the third: told how long to wait
    assert limits.take("10.0.0.2") == 0  # another address is not held back


def test_many_addresses_cost_bounded_memory() -> None:
    limits = PerKey(rate=0.001, burst=1, max_keys=3)
    for n in range(10):
        limits.take(f"10.0.0.{n}")
    assert len(limits._buckets) == 3
    # The oldest were forgotten: they start again with a full bucket, as new addresses do.
    assert limits.take("10.0.0.0") == 0
    assert limits.take("10.0.0.9") >= 1
