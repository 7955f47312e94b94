"""Layer-pair selection: exact outputs of each strategy, random draws' properties, the schedule."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from leadkd.config.layer_strategy import STRATEGIES as CONFIG_STRATEGIES
from leadkd.distill.layers import STRATEGIES, LayerSchedule, select_layers
from leadkd.runtime.errors import ConfigError, LeadkdError


def gen(seed: int = 888) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- fixed strategies


@pytest.mark.parametrize("student,teacher,k,expected", [
    (6, 12, 5, [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]),   # the paper code's 'last'
    (3, 6, 2, [(1, 4), (2, 5)]),
    (3, 6, 3, [(0, 3), (1, 4), (2, 5)]),
])
def test_last(student, teacher, k, expected):
    assert select_layers("last", student, teacher, k) == expected


@pytest.mark.parametrize("student,teacher,k,expected", [
    (6, 12, 5, [(1, 0), (2, 2), (3, 4), (4, 6), (5, 8)]),     # the paper code's 'skip'
    (3, 6, 3, [(0, 0), (1, 2), (2, 4)]),
    (3, 6, 2, [(1, 0), (2, 2)]),
    (12, 24, 6, [(6, 0), (7, 2), (8, 4), (9, 6), (10, 8), (11, 10)]),
])
def test_skip(student, teacher, k, expected):
    assert select_layers("skip", student, teacher, k) == expected


#: The paper code's lists (spec §2.6), written out: they do not depend on the depths.
PAPER_LAST = [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
PAPER_SKIP = [(1, 0), (2, 2), (3, 4), (4, 6), (5, 8)]


@pytest.mark.parametrize("student,teacher", [(6, 12), (12, 24)])   # both depth pairs of the paper
@pytest.mark.parametrize("k", [5, 2])                                # K does not change the paper's lists
def test_paper_last_and_skip_are_the_codes_lists_for_every_depth_pair(student, teacher, k):
    assert select_layers("paper_last", student, teacher, k) == PAPER_LAST
    assert select_layers("paper_skip", student, teacher, k) == PAPER_SKIP


def test_depth_following_last_and_skip_differ_from_the_paper_for_12_from_24():
    assert select_layers("last", 12, 24, 5) == [(7, 19), (8, 20), (9, 21), (10, 22), (11, 23)] != PAPER_LAST
    assert select_layers("skip", 12, 24, 5) == [(7, 0), (8, 2), (9, 4), (10, 6), (11, 8)] != PAPER_SKIP
    assert select_layers("last", 6, 12, 5) == PAPER_LAST and select_layers("skip", 6, 12, 5) == PAPER_SKIP


def test_paper_lists_need_the_papers_depths():
    with pytest.raises(ConfigError, match=r"'paper_skip'.*>= 6.*>= 12 layers; these have 3 and 6.*use 'skip'"):
        select_layers("paper_skip", 3, 6, 2)
    schedule = LayerSchedule("paper_last", 6, 12, k=5, seed=1, resample_interval=1)
    assert [schedule.pairs_for_step(step) for step in range(3)] == [PAPER_LAST] * 3


def test_skip_needs_enough_teacher_layers():
    assert select_layers("skip", 4, 7, 4) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    with pytest.raises(ConfigError, match="needs 7 teacher layers; the teacher has 6"):
        select_layers("skip", 6, 6, 4)


@pytest.mark.parametrize("strategy", ["random", "last", "skip"])
def test_k_larger_than_a_model_names_both_depths(strategy):
    with pytest.raises(ConfigError, match="student has 6 layers and the teacher 12"):
        select_layers(strategy, 6, 12, 7, gen())
    with pytest.raises(ConfigError, match="student has 12 layers and the teacher 3"):
        select_layers(strategy, 12, 3, 4, gen())
    with pytest.raises(ConfigError, match=">= 1"):
        select_layers(strategy, 6, 12, 0, gen())


def test_unknown_strategy_and_missing_generator():
    with pytest.raises(ConfigError,
                       match=r"^layers.strategy: expected one of .*, got 'randm' \(did you mean 'random'\?\)$"):
        select_layers("randm", 6, 12, 5, gen())
    with pytest.raises(LeadkdError, match="seeded torch.Generator"):
        select_layers("random", 6, 12, 5)


# --------------------------------------------------------------------------- explicit maps


def test_one_list_of_strategy_names():
    assert STRATEGIES is CONFIG_STRATEGIES and "map" in STRATEGIES


def test_explicit_map_is_sorted():
    assert select_layers("map", 6, 12, 5, pairs=[(2, 5), (0, 1), (1, 3)]) == [(0, 1), (1, 3), (2, 5)]  # k ignored
    # crossing pairs: the user's choice
    assert select_layers("map", 2, 4, 2, pairs=[[0, 3], [1, 2]]) == [(0, 3), (1, 2)]


def test_old_map_spelling_is_read_as_map():
    assert select_layers("0:1,1:3,2:5", 6, 12, 5) == [(0, 1), (1, 3), (2, 5)]
    assert select_layers(" 2:5 , 0:1 ", 3, 6, 2) == [(0, 1), (2, 5)]
    assert select_layers("5:11", 6, 12, 5) == select_layers(311, 6, 12, 5) == [(5, 11)]  # 311: YAML 1.1's base 60


@pytest.mark.parametrize("strategy,pairs,match", [
    ("map", [(6, 1)], (r"^layers.pairs: pair \[6, 1\] is out of range; the student has 6 layers \(0..5\) and the "
                       r"teacher 12 \(0..11\)$")),
    ("map", [(0, 12)], r"pair \[0, 12\] is out of range"),
    ("map", [(0, 1), (0, 2)], r"^layers.pairs: \[\(0, 1\), \(0, 2\)\] uses a student layer twice \(layer 0\)$"),
    ("map", [(0, 1), (1, 1)], r"uses a teacher layer twice \(layer 1\)"),
    ("map", [(-1, 3)], r"^layers.pairs: expected \[student, teacher\] pairs of layer numbers \(>= 0\)"),
    ("map", [], r"expected \[student, teacher\] pairs"),
    ("map", None, r"^layers.pairs: strategy 'map' needs its \[student, teacher\] pairs"),
    ("skip", [(0, 1)], r"^layers.pairs: only strategy 'map' takes pairs"),
    ("0:1", [(0, 1)], r"^layers.pairs: set beside the old-style map '0:1'"),
    ("0:1,", None, (r"^layers.strategy: expected one of .* or old-style student:teacher pairs like '0:1,1:3,2:5', "
                    r"got '0:1,'$")),
    (",", None, "old-style student:teacher pairs"),
    ("0-1", None, "old-style student:teacher pairs"),
    ("a:b", None, "old-style student:teacher pairs"),
    ("0:1:2", None, "old-style student:teacher pairs"),
    ("-1:3", None, "old-style student:teacher pairs"),
    ("6:1", None, r"^layers.pairs: pair \[6, 1\] is out of range"),
    ("0:1,0:2", None, r"^layers.strategy: '0:1,0:2' uses a student layer twice \(layer 0\)$"),
    ("0:1,1:1", None, r"teacher layer twice \(layer 1\)"),
    ("  ", None, r"^layers.strategy: expected one of"),
])
def test_explicit_map_errors(strategy, pairs, match):
    with pytest.raises(ConfigError, match=match):
        select_layers(strategy, 6, 12, 5, pairs=pairs)


# --------------------------------------------------------------------------- random


def test_random_is_deterministic_for_a_seed_and_uses_exactly_two_permutations():
    a, b = gen(7), gen(7)
    draws_a = [select_layers("random", 6, 12, 5, a) for _ in range(20)]
    draws_b = [select_layers("random", 6, 12, 5, b) for _ in range(20)]
    assert draws_a == draws_b
    assert len({tuple(d) for d in draws_a}) > 1  # it does change from draw to draw
    # a process that draws the same way by hand stays in step (nothing else consumes the generator)
    manual = gen(7)
    torch.randperm(6, generator=manual), torch.randperm(12, generator=manual)
    first = gen(7)
    select_layers("random", 6, 12, 5, first)
    assert torch.equal(first.get_state(), manual.get_state())


def test_random_pairs_are_sorted_distinct_in_range_and_order_preserving():
    g = gen(3)
    for student, teacher, k in [(6, 12, 5), (3, 6, 3), (12, 24, 6), (4, 4, 4), (6, 12, 1)]:
        for _ in range(50):
            pairs = select_layers("random", student, teacher, k, g)
            assert len(pairs) == k
            students, teachers = [s for s, _ in pairs], [t for _, t in pairs]
            assert students == sorted(set(students)) and teachers == sorted(set(teachers))
            assert all(0 <= s < student for s in students) and all(0 <= t < teacher for t in teachers)


def test_random_draws_are_roughly_uniform_and_can_take_final_layers():
    g, draws = gen(11), 3000
    students, teachers = Counter(), Counter()
    for _ in range(draws):
        for s, t in select_layers("random", 6, 12, 2, g):
            students[s] += 1
            teachers[t] += 1
    # each student layer is chosen with probability 2/6 (expected 1000, sd ~26); teacher 2/12 (500, sd ~20)
    assert set(students) == set(range(6)) and all(abs(c - 1000) < 150 for c in students.values())
    assert set(teachers) == set(range(12)) and all(abs(c - 500) < 120 for c in teachers.values())


def test_full_depth_random_is_every_layer():
    assert select_layers("random", 3, 6, 3, gen())[-1][0] == 2
    assert [s for s, _ in select_layers("random", 4, 4, 4, gen())] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- the schedule


def reference_draws(n: int, seed: int = 888) -> list[list[tuple[int, int]]]:
    g = gen(seed)
    return [select_layers("random", 6, 12, 5, g) for _ in range(n)]


def test_schedule_resamples_every_interval():
    schedule = LayerSchedule("random", 6, 12, k=5, seed=888, resample_interval=10)
    draws = reference_draws(4)
    assert schedule.pairs == draws[0]
    for step in range(40):
        assert schedule.pairs_for_step(step) == draws[step // 10]


def test_schedule_does_not_depend_on_the_calling_pattern():
    every = LayerSchedule("random", 6, 12, resample_interval=3)
    sparse = LayerSchedule("random", 6, 12, resample_interval=3)
    for step in range(61):
        pairs = every.pairs_for_step(step)
        if step in (0, 7, 25, 60):
            assert sparse.pairs_for_step(step) == pairs
    with pytest.raises(ValueError, match="cannot go back"):
        sparse.pairs_for_step(10)
    with pytest.raises(ValueError):
        sparse.pairs_for_step(-1)


def test_schedule_without_resampling_and_fixed_strategies():
    frozen = LayerSchedule("random", 6, 12, resample_interval=None)
    assert frozen.pairs_for_step(1000) == reference_draws(1)[0]
    skip = LayerSchedule("skip", 6, 12, k=5)
    assert skip.pairs_for_step(0) == skip.pairs_for_step(95) == [(1, 0), (2, 2), (3, 4), (4, 6), (5, 8)]
    explicit = LayerSchedule("map", 6, 12, pairs=[(5, 11), (0, 1)])
    assert explicit.pairs_for_step(123) == [(0, 1), (5, 11)]
    assert LayerSchedule("0:1,5:11", 6, 12).pairs_for_step(0) == [(0, 1), (5, 11)]  # the old spelling
    with pytest.raises(ConfigError, match="resample interval"):
        LayerSchedule("random", 6, 12, resample_interval=0)


def test_schedule_state_round_trip_continues_the_same_sequence():
    original = LayerSchedule("random", 6, 12, k=4, seed=5, resample_interval=10)
    original.pairs_for_step(23)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = LayerSchedule("random", 6, 12, k=4, seed=5, resample_interval=10)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.pairs == original.pairs
    for step in range(23, 90):
        assert resumed.pairs_for_step(step) == original.pairs_for_step(step)


def test_schedule_refuses_a_state_from_other_settings():
    state = LayerSchedule("random", 6, 12, k=5, seed=1).state_dict()
    with pytest.raises(LeadkdError, match="k 5 .now 3."):
        LayerSchedule("random", 6, 12, k=3, seed=1).load_state_dict(state)
    with pytest.raises(LeadkdError, match="seed 1 .now 2."):
        LayerSchedule("random", 6, 12, k=5, seed=2).load_state_dict(state)
    mapped = LayerSchedule("map", 6, 12, pairs=[(0, 1), (5, 11)]).state_dict()
    with pytest.raises(LeadkdError, match=r"map_pairs \[\[0, 1\], \[5, 11\]\] .now \[\[0, 1\]\]."):
        LayerSchedule("map", 6, 12, pairs=[(0, 1)]).load_state_dict(mapped)


def test_a_schedule_saved_with_the_old_map_spelling_resumes():
    """A checkpoint from before ``map_pairs`` holds the map as its strategy, and no ``map_pairs``."""
    state = LayerSchedule("map", 6, 12, pairs=[(0, 1), (5, 11)]).state_dict()
    old = {**{key: value for key, value in state.items() if key != "map_pairs"}, "strategy": "0:1,5:11"}
    resumed = LayerSchedule("map", 6, 12, pairs=[(5, 11), (0, 1)])
    resumed.load_state_dict(old)
    assert resumed.pairs == [(0, 1), (5, 11)]
    with pytest.raises(LeadkdError, match="map_pairs"):
        LayerSchedule("map", 6, 12, pairs=[(0, 1)]).load_state_dict(old)
