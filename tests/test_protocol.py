"""The protocol's decisions as pure functions: fork rule, round start, commit. No network, milliseconds."""

from __future__ import annotations

import pytest

from coldfusion_p2p.protocol import (
    Absentees, Blamed, Newcomers, NoShows, RoundView, VerdictView, choose_base, decide_commit, newcomers_to_blame, round_start, to_verify,
)

H = {c: c * 64 for c in "abcdef0123"}


def signers_of(table):
    return lambda v, h: table.get((v, h))


def test_fork_rule_counts_certificates_never_announcers():
    announced = {"p1": (3, H["b"]), "p2": (3, H["b"]), "p3": (3, H["b"]), "p4": (3, H["c"]), "me": (2, H["a"])}
    # three announcers of b, one of c; c's certificate has more member signatures: c wins
    choice = choose_base(announced, signers_of({(3, H["b"]): 2, (3, H["c"]): 3, (2, H["a"]): 2}), (2, H["a"]), "me")
    assert (choice.version, choice.hash, choice.holders, choice.signers) == (3, H["c"], ("p4",), 3)
    # at equal signatures, the smaller hash
    choice = choose_base(announced, signers_of({(3, H["b"]): 3, (3, H["c"]): 3, (2, H["a"]): 2}), (2, H["a"]), "me")
    assert choice.hash == H["b"] and choice.holders == ("p1", "p2", "p3")


def test_uncertified_or_skipped_versions_are_never_chosen_however_many_announce_them():
    announced = {f"sybil{i}": (99, H["f"]) for i in range(50)} | {"p1": (4, H["d"])}
    table = {(4, H["d"]): 2, (3, H["a"]): 2}  # (99, f) has no certificate chained to v0
    choice = choose_base(announced, signers_of(table), (3, H["a"]), "me")
    assert (choice.version, choice.hash) == (4, H["d"])
    assert choose_base(announced, signers_of(table), (3, H["a"]), "me", skip={(4, H["d"])}) is None
    assert choose_base({"p1": (4, H["d"])}, signers_of(table), (4, H["d"]), "me") is None  # already there
    # never backwards: a certified lower version does not replace ours
    assert choose_base({"p1": (2, H["e"])}, signers_of({(2, H["e"]): 9, (3, H["a"]): 2}), (3, H["a"]), "me") is None


def test_same_version_fork_moves_to_the_better_certified_side_only():
    announced = {"p1": (5, H["b"])}
    assert choose_base(announced, signers_of({(5, H["a"]): 2, (5, H["b"]): 4}), (5, H["a"]), "me").hash == H["b"]
    assert choose_base(announced, signers_of({(5, H["a"]): 4, (5, H["b"]): 2}), (5, H["a"]), "me") is None


def test_a_newcomer_takes_the_best_certified_served_version():
    announced = {"boot": (0, H["0"]), "p1": (2, H["a"]), "liar": (7, H["f"])}
    choice = choose_base(announced, signers_of({(0, H["0"]): 0, (2, H["a"]): 2}), None, "me")
    assert (choice.version, choice.holders) == (2, ("p1",))


def test_to_verify_lists_unjudged_versions_newest_first():
    announced = {"a": (5, H["a"]), "b": (7, H["b"]), "c": (1, H["c"]), "d": (7, H["b"]), "e": (6, H["e"])}
    got = to_verify(announced, lambda v, h: (v, h) == (5, H["a"]), (3, H["0"]), "me", skip={(6, H["e"])})
    assert got == [((7, H["b"]), ("b", "d"))]


def view(**kw):
    base = dict(me="me", now=100.0, my_ready_t=90.0, ready={}, training=frozenset(), left=frozenset(), holding=frozenset(),
                contributors=frozenset(), no_shows=frozenset())
    base.update(kw)
    return RoundView(**base)


def test_round_waits_for_trainers_until_the_window_closes():
    v = view(ready={"a": 95.0}, training=frozenset({"b"}))
    start = round_start(v, min_group_size=2, round_window=30.0)
    assert not start.start and start.missing == ("b",) and not start.window_closed
    start = round_start(view(ready={"a": 95.0}, training=frozenset({"b"}), now=200.0), 2, 30.0)
    assert start.start and start.window_closed and start.ready == ("a", "me")


def test_makers_of_the_base_that_still_hold_it_are_expected_unless_they_left():
    v = view(ready={"a": 95.0}, contributors=frozenset({"a", "b", "c"}), holding=frozenset({"a", "b"}), left=frozenset())
    assert round_start(v, 2, 30.0).missing == ("b",)
    v = view(ready={"a": 95.0}, contributors=frozenset({"a", "b"}), holding=frozenset({"a", "b"}), left=frozenset({"b"}))
    assert round_start(v, 2, 30.0).start


def test_phantom_trainers_cost_one_window_then_are_not_waited_for():
    phantoms = frozenset(f"ghost{i}" for i in range(100))
    shows = NoShows()
    first = round_start(view(ready={"a": 95.0}, training=phantoms, now=200.0), 2, 30.0)
    assert first.start and first.window_closed
    shows.after_window(first)
    second = round_start(view(ready={"a": 195.0}, my_ready_t=196.0, now=197.0, training=phantoms, no_shows=frozenset(shows.peers)), 2, 30.0)
    assert second.start and not second.missing  # the next round starts at once
    shows.seen(["ghost3"])  # a no-show that turns up ready is waited for again
    assert "ghost3" not in shows.peers and "ghost4" in shows.peers


def test_ready_peers_that_never_join_are_not_waited_for_and_each_miss_lasts_four_times_longer():
    absent = Absentees()
    assert absent.missed(["ghost", "late"], 7) == ["ghost", "late"]
    assert not absent.waited_for("ghost", 7) and not absent.waited_for("ghost", 8)  # v7's redos, and v8's round
    assert absent.missed(["ghost"], 8) == []  # not waited for there: not missed again
    assert absent.waited_for("ghost", 9) and absent.waited_for("bob", 7)
    absent.seen(["late"])  # it made a group: waited for again at once, its misses forgotten
    assert absent.waited_for("late", 8) and "late" not in absent.peers
    assert absent.missed(["ghost"], 9) == ["ghost"]  # waited for again, missed again: 4 versions
    assert not absent.waited_for("ghost", 13) and absent.waited_for("ghost", 14)
    for v in (14, 31, 96, 161):  # 16, then 64 versions at most
        assert absent.missed(["ghost"], v) == ["ghost"]
    assert absent.peers["ghost"] == (6, 161 + 64)
    sybils = Absentees()
    sybils.missed((f"key{i}" for i in range(20_000)), 1)
    assert len(sybils.peers) == 10_000 and "key19999" in sybils.peers and "key0" not in sybils.peers


def test_newcomers_are_left_out_after_each_spoil_for_longer_and_taken_again_on_probation():
    guard = Newcomers()
    assert all(guard.admitted(v) for v in range(100))  # a swarm where no newcomer ever spoiled leaves no one out
    assert guard.spoiled(3) == 1 and not guard.admitted(3) and not guard.admitted(4) and guard.admitted(5)
    assert guard.spoiled(4) == 0 and guard.strikes == 1  # a failure while they are left out is no newcomer's
    assert guard.spoiled(5) == 4 and not guard.admitted(9) and guard.admitted(10)  # on probation at v5: spoiled again
    assert guard.spoiled(10) == 16 and guard.spoiled(27) == 16 and guard.strikes == 3  # never longer than 16 (a strike
    # is forgotten per 16 versions: one spoil per 17 versions holds it there)
    # one spoiled attempt per 17 versions at most, however many keys the spoiler has
    spoils = [v for v in range(27, 300) if guard.admitted(v) and guard.spoiled(v)]
    assert len(spoils) <= (300 - 27) // 17 + 1 and all(b - a == 17 for a, b in zip(spoils, spoils[1:]))
    calm = Newcomers()
    calm.spoiled(1), calm.spoiled(3)  # two strikes: four versions
    assert calm.strikes == 2 and calm.spoiled(3 + 16 * 2) == 1  # 32 quiet versions forget both: one version again


def test_a_failed_group_is_a_newcomers_strike_only_where_a_newcomer_is_to_blame_or_nobody_could_be_named():
    known = {"ann", "bob"}
    assert newcomers_to_blame(["me", "ann", "bob", "new"], ["new"], known, "me") == ["new"]
    assert newcomers_to_blame(["me", "ann", "bob", "new"], ["bob"], known, "me") == []  # a known member failed it
    assert newcomers_to_blame(["me", "ann", "new", "x"], [], known, "me") == ["new", "x"]  # a stall that names no one
    assert newcomers_to_blame(["me", "ann", "bob"], [], known, "me") == []  # no newcomer in it
    assert newcomers_to_blame(["me", "new"], ["me", "new"], known, "me") == ["new"]  # a peer never blames itself


def test_a_known_peer_that_fails_groups_again_is_left_out_for_longer_each_time_and_a_signature_does_not_clear_it():
    blamed = Blamed()
    assert blamed.blame("mal", 10) == 0 and blamed.left_out("mal", 10) and not blamed.left_out("mal", 11)  # the redos only
    assert blamed.blame("mal", 12) == 3 and blamed.left_out("mal", 15) and not blamed.left_out("mal", 16)  # behaved at v11
    assert blamed.blame("mal", 16) == 15 and blamed.blame("mal", 32) == 15  # then 15 (a blame is forgotten per 16 versions)
    # one key that spoils whenever it is let in: one spoiled attempt per 16 versions from then on
    spoils = [v for v in range(33, 300) if not blamed.left_out("mal", v) and blamed.blame("mal", v) >= 0]
    assert len(spoils) == len(range(48, 300, 16)) and all(b - a == 16 for a, b in zip(spoils, spoils[1:])), spoils
    flaky = Blamed()
    assert flaky.blame("bob", 5) == 0 and flaky.blame("bob", 5 + 16) == 0  # once per 16 versions: never left out past its round
    assert not flaky.left_out("bob", 22) and not flaky.left_out("ann", 5)


def test_a_forged_early_ready_time_does_not_stretch_or_skip_the_window():
    # a record claiming readiness long ago counts from a few seconds before this peer first saw it
    seen = {"liar": 95.0}
    v = view(ready={"liar": -1e9}, training=frozenset({"slow"}), my_ready_t=97.0, now=100.0, first_seen=seen)
    assert not round_start(v, 2, 30.0).start
    late = view(ready={"liar": -1e9}, training=frozenset({"slow"}), my_ready_t=97.0, now=126.0, first_seen=seen)
    assert round_start(late, 2, 30.0).start  # 90 + 30 < 126
    # an honest early peer seen on time keeps its own time: everyone's window closes together
    honest = view(ready={"a": 80.0}, training=frozenset({"slow"}), my_ready_t=97.0, now=111.0, first_seen={"a": 82.0})
    assert round_start(honest, 2, 30.0).start


def test_alone_never_starts():
    assert not round_start(view(now=1e6), 2, 30.0).start


def V(result, clean=True):
    return VerdictView(result, clean)


def test_commit_needs_a_clean_own_view_and_every_answer_to_agree():
    group = ["me", "a", "b"]
    assert decide_commit("me", "h1", False, group, {"a": V("h1"), "b": V("h1")}, 2, False).action == "redo"
    assert decide_commit("me", "h1", True, group, {"a": V("h1"), "b": V("h1")}, 2, False).action == "commit"
    assert decide_commit("me", "h1", True, group, {"a": V("h1")}, 2, False).action == "wait"  # b may still object
    assert decide_commit("me", "h1", True, group, {}, 2, False).action == "wait"
    assert decide_commit("me", "h1", True, group, {}, 2, True).action == "redo"  # alone after the wait


def test_any_dissent_redoes_at_once_and_names_the_dissenters():
    # an honest member that saw a fault stops a mixed average; a liar costs a redo, and is named so the
    # caller leaves it out of the round's redos
    d = decide_commit("me", "h1", True, ["me", "a", "b", "liar"], {"a": V("h1"), "liar": V("", clean=False)}, 2, False)
    assert d.action == "redo" and d.dissent == ("liar",) and d.silent == ("b",)
    d = decide_commit("me", "h1", True, ["me", "a", "b"], {"a": V("h1"), "b": V("h2")}, 2, False)
    assert d.action == "redo" and d.dissent == ("b",)


def test_silent_members_are_waited_for_then_left():
    # the dead or absent cannot hold the round past the wait
    d = decide_commit("me", "h1", True, ["me", "a", "b", "dead"], {"a": V("h1")}, 2, True)
    assert d.action == "commit" and d.silent == ("b", "dead")
    assert decide_commit("me", "h1", True, ["me", "a", "b", "dead"], {"a": V("h1")}, 2, False).action == "wait"
    # verdicts from outside the group do not count
    d = decide_commit("me", "h1", True, ["me", "a"], {"x": V("h1"), "y": V("h1")}, 2, True)
    assert d.action == "redo"


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_a_clean_unanimous_group_always_commits(size):
    group = ["me"] + [f"p{i}" for i in range(size - 1)]
    d = decide_commit("me", "h", True, group, {p: V("h") for p in group[1:]}, 2, False)
    assert d.action == "commit" and len(d.agree) == size


def test_blame_leaves_out_a_reducer_that_lied_to_many_members_and_otherwise_the_dissenters():
    from coldfusion_p2p.protocol import blame

    members = ["a", "b", "c", "d", "r"]
    honest = {p: f"h-{p}" for p in members}  # reducer -> digest of its slice, as every member got it

    def seen(views, me):
        return {p: v for p, v in views.items() if p != me}

    # r sends every member other averages: each member leaves out r alone, so a group of four remains
    views = {p: {**honest, "r": f"lie-to-{p}"} for p in "abcd"} | {"r": honest}
    for me in "abcd":
        assert blame(me, views[me], [p for p in members if p != me], seen(views, me)) == {"r"}
    # r lies to one member: the others cannot tell a lie from a liar and leave out that member, as before
    # the digests; the member lied to sees three others hold another digest for r's slice and leaves out r
    views = {p: honest for p in members} | {"a": {**honest, "r": "lie-to-a"}}
    assert blame("b", honest, ["a"], seen(views, "b"), agree=["c", "d", "r"]) == {"a"}
    assert blame("a", views["a"], ["b", "c", "d", "r"], seen(views, "a")) == {"r"}
    # one member that says an honest reducer's slice differs is left out itself, by that reducer and the rest
    views = {p: honest for p in members} | {"a": {**honest, "c": "made-up"}}
    assert blame("c", honest, ["a"], seen(views, "c")) == {"a"}
    assert blame("b", honest, ["a"], seen(views, "b")) == {"a"}
    # ... even when the honest members' digests are not in yet: their verdicts agree with this peer's
    assert blame("b", honest, ["a"], {"a": views["a"]}, agree=["c", "d"]) == {"a"}
    # same slices and still another result, a digest missing, or no digests at all (the release before)
    assert blame("b", honest, ["a"], {"a": honest}) == {"a"}
    assert blame("b", honest, ["a"], {"a": {k: v for k, v in honest.items() if k != "d"}}) == {"a"}
    assert blame("b", honest, ["a"], {}) == {"a"}
    assert blame("b", {}, ["a"], {"a": honest}) == {"a"}
    # a reducer that reports its own slice otherwise than this peer got it is that reducer
    assert blame("b", honest, ["r"], {"r": {**honest, "r": "other"}}) == {"r"}


def test_blame_cannot_be_steered_by_members_that_make_up_digests():
    from coldfusion_p2p.protocol import blame

    members = ["a", "b", "c", "d", "e"]
    honest = {p: f"h-{p}" for p in members}
    # a member that says every slice differs: only it is left out, never every reducer
    views = {p: honest for p in members} | {"a": {p: "made-up" for p in members}}
    for me in "bcde":
        assert blame(me, honest, ["a"], {p: v for p, v in views.items() if p != me}) == {"a"}
    # two reducers that lie to the same member, or a member that says so: that member is left out
    views = {p: honest for p in members} | {"a": {**honest, "d": "x", "e": "y"}}
    assert blame("b", honest, ["a"], {p: v for p, v in views.items() if p != "b"}) == {"a"}
    # two colluders each framing another honest member: the honest pair keep each other (red team)
    honest4 = {p: f"h-{p}" for p in ("A", "B", "L1", "L2")}
    views = {"A": honest4, "B": honest4, "L1": {**honest4, "A": "x"}, "L2": {**honest4, "B": "y"}}
    assert blame("A", honest4, ["L1", "L2"], {p: v for p, v in views.items() if p != "A"}, agree=["B"]) == {"L1", "L2"}
    assert blame("B", honest4, ["L1", "L2"], {p: v for p, v in views.items() if p != "B"}, agree=["A"]) == {"L1", "L2"}
    # two colluders framing one honest reducer the same way, against an honest majority: they are left out
    views = {p: honest for p in members} | {"d": {**honest, "c": "z"}, "e": {**honest, "c": "z"}}
    assert blame("a", honest, ["d", "e"], {p: v for p, v in views.items() if p != "a"}, agree=["b", "c"]) == {"d", "e"}


def test_a_member_that_says_every_slice_differs_is_no_witness_against_any_one_reducer():
    from coldfusion_p2p.protocol import blame

    group = ["A", "T", "L1", "L2"]
    honest = {p: f"h-{p}" for p in group}
    views = {"T": honest, "L1": {p: "made-up" for p in group}, "L2": {**honest, "T": "x"}}  # L2 frames T, L1 says all differ
    assert blame("A", honest, ["L1", "L2"], views) == {"L1", "L2"}
