"""The round protocol's decisions as pure functions of parsed records, with named results.

Which base to adopt (the fork rule), whether a round may start, and whether to commit are decided
here from plain data, so each rule is tested in milliseconds without a network
(``tests/test_protocol.py``). ``contributor`` reads the records, calls these, and acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

Version = tuple[int, str]  # (v, body hash)


# --- the fork rule ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseChoice:
    """The base the swarm should be on: its version, hash, the peers that announce it, and how many
    members signed its certificate."""

    version: int
    hash: str
    holders: tuple[str, ...]
    signers: int


def candidates(announced: Mapping[str, Version], me: str) -> dict[Version, tuple[str, ...]]:
    """Announced versions with the other peers that announce them (sorted peer ids)."""
    out: dict[Version, list[str]] = {}
    for peer, key in announced.items():
        if peer != me:
            out.setdefault(key, []).append(peer)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def choose_base(announced: Mapping[str, Version], signers: Callable[[int, str], int | None], current: Version | None,
                me: str, skip: Iterable[Version] = ()) -> BaseChoice | None:
    """The fork rule over *certified* versions: the highest version wins; at the same version, the one
    whose certificate has the most valid member signatures; at a tie, the smaller hash.

    ``signers(v, hash)`` is None for a version this peer does not accept (no valid certificate chained
    to v0): such a version is never chosen, however many peers announce it. Announcers are never
    counted. Returns None when ``current`` should stay (or nothing is certified and served).
    """
    skipped = set(skip)
    best: tuple | None = None
    choice = None
    pool = candidates(announced, me)
    if current is not None:
        pool.setdefault(current, ())
    for (v, h), holders in pool.items():
        count = signers(v, h)
        if count is None or ((v, h) in skipped and (v, h) != current):
            continue
        if not holders and (v, h) != current:
            continue
        rank = (v, count, tuple(-ord(c) for c in h))
        if best is None or rank > best:
            best, choice = rank, BaseChoice(v, h, holders, count)
    if choice is None or current is None or (choice.version, choice.hash) == current:
        return None if current is not None else choice
    return choice if choice.version >= current[0] else None


def to_verify(announced: Mapping[str, Version], accepted: Callable[[int, str], bool], current: Version, me: str,
              skip: Iterable[Version] = ()) -> list[tuple[Version, tuple[str, ...]]]:
    """Announced versions at or above ``current`` that this peer has not judged yet, newest first:
    their certificate chains are worth fetching."""
    skipped = set(skip)
    out = [(key, holders) for key, holders in candidates(announced, me).items()
           if key[0] >= current[0] and key not in skipped and not accepted(*key)]
    return sorted(out, key=lambda kv: (-kv[0][0], kv[0][1]))


# --- gathering a round ------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundView:
    """What a ready peer sees of the round on its base."""

    me: str
    now: float  # DHT time
    my_ready_t: float
    ready: Mapping[str, float]  # peer -> when it became ready (its record's t)
    training: frozenset[str]
    left: frozenset[str]
    holding: frozenset[str]  # peers that announce this base
    contributors: frozenset[str]  # the members who made this base
    no_shows: frozenset[str] = frozenset()  # peers that were waited for once and never came
    first_seen: Mapping[str, float] = field(default_factory=dict)  # when this peer first saw each ready record


SEEN_SLACK = 5.0  # seconds between a record's writing and a polling peer seeing it


@dataclass(frozen=True)
class RoundStart:
    start: bool
    ready: tuple[str, ...]
    missing: tuple[str, ...]  # expected peers that are not ready yet
    window_closed: bool


def round_start(view: RoundView, min_group_size: int, round_window: float) -> RoundStart:
    """Whether the round may start: every expected peer is ready, or the round window has closed.

    Expected: peers announcing ``training`` on this base and this base's makers that still hold it,
    except those that left and *no-shows* (a peer waited for once, through a whole window, is not
    waited for again until it shows up: phantom trainers delay at most one round, by one window).
    The window counts from the first ready peer. A record may claim any time, so a claimed time counts
    from no earlier than a few seconds before this peer first saw the record: a forged early time
    cannot close the window on peers still training.
    """
    ready = {p: max(t, view.first_seen.get(p, t) - SEEN_SLACK) for p, t in view.ready.items()}
    ready[view.me] = view.my_ready_t
    expected = (set(view.training) | (set(view.contributors) & set(view.holding))) - set(view.left) - set(view.no_shows)
    missing = tuple(sorted(expected - set(ready)))
    first = min(ready.values())
    window_closed = view.now - first > round_window
    start = len(ready) >= min_group_size and (not missing or window_closed)
    return RoundStart(start, tuple(sorted(ready)), missing, window_closed)


# --- committing a round -----------------------------------------------------------------------
@dataclass(frozen=True)
class VerdictView:
    result: str
    clean: bool


@dataclass(frozen=True)
class CommitDecision:
    action: str  # "commit", "wait" (for more verdicts) or "redo"
    agree: tuple[str, ...] = ()  # members whose clean verdict names our result
    dissent: tuple[str, ...] = ()
    silent: tuple[str, ...] = ()
    reason: str = ""


def decide_commit(me: str, result: str, clean: bool, group: Iterable[str], verdicts: Mapping[str, VerdictView],
                  min_group_size: int, timed_out: bool) -> CommitDecision:
    """Commit when our own view is clean and the group agrees on our result.

    Agree: members whose clean, signed verdict names our hash (we count ourselves). Once everyone
    answered (or the wait timed out: the silent are dead or absent), commit when they are at least
    ``min_group_size`` and nobody dissents. Any dissent means a redo, and the caller leaves the
    dissenters out of the round's redos: an honest member that saw a fault (a dead reducer, a sender
    dropped mid-way) never lets the others commit a mixed average, and a member that lies about its
    view costs one redo per round, never the round.
    """
    group = tuple(sorted(set(group)))
    if not clean or not result:
        return CommitDecision("redo", reason="this peer's own view of the all-reduce is not clean")
    agree = {me} | {p for p, v in verdicts.items() if p in group and v.clean and v.result == result}
    answered = {p for p in verdicts if p in group} | {me}
    dissent = tuple(sorted(answered - agree))
    silent = tuple(sorted(set(group) - answered))
    agree_t = tuple(sorted(agree))
    if dissent:  # no need to wait for the rest: this all-reduce will not be committed
        why = f"{len(dissent)} member(s) saw another result or an unclean all-reduce"
        return CommitDecision("redo", agree_t, dissent, silent, why)
    if silent and not timed_out:
        return CommitDecision("wait", agree_t, dissent, silent)
    if len(agree) >= min_group_size:
        return CommitDecision("commit", agree_t, dissent, silent)
    why = f"{len(agree)} of {len(group)} member(s) agree, {len(silent)} silent"
    return CommitDecision("redo", agree_t, dissent, silent, why)


def blame(me: str, mine: Mapping[str, str], dissent: Iterable[str], slices: Mapping[str, Mapping[str, str]],
          agree: Iterable[str] = ()) -> set[str]:
    """The members to leave out of a round's redos after ``dissent`` saw another result than this peer.

    ``mine`` and ``slices`` (each member's that published them) map each reducer to the digest of the
    slice of the average it got from that reducer (``fusion.slice_digests``); ``agree``: members whose
    verdict names this peer's result, who therefore hold this peer's digests. The rule before the
    digests stands (every dissenter is left out) except where the digests show, on evidence no single
    member can make up, that one reducer sent members different averages: then that reducer alone is
    left out, and the dissenters it lied to stay. Without this, a reducer that sends every member
    slightly other averages (inside the round's bound, so no check catches them) had every member
    leave out every other: no group, every round, for as long as it stayed.

    A dissenter is left out when it published no digests or not one for every slice this peer holds,
    when it names another digest for this peer's slice or its own (this peer sent the same bytes to
    everyone; a reducer that reports its own slice otherwise lies), when all its digests match (it saw
    the same averages and names another result), or when it names another digest for two or more
    reducers. When it names another digest for exactly one reducer r, r is left out instead, if at
    least two members other than r and this peer name a whole record that differs from this peer's at
    r's slice alone, and they outnumber those that hold this peer's (this peer, ``agree``, and any other
    member's matching digest; r's word on its own slice does not count). One member framing an honest
    reducer, or two framing it against an honest majority, are left out themselves; a reducer that
    lies to one member is not caught this way (that member is left out, as before), nor can three
    members tell a lying reducer from a lying member: both need the reducer's signature on its slice.
    """
    agree = set(agree) | {me}
    # for each member with a whole record: the reducers whose slice it names otherwise than this peer
    differs = {p: [r for r in mine if s[r] != mine[r]] for p, s in slices.items() if set(mine) <= set(s)}
    out: set[str] = set()
    for d in dissent:
        differ = differs.get(d)
        if differ is None or len(differ) != 1 or me in differ or d in differ:
            out.add(d)
            continue
        r = differ[0]
        accusers = {p for p, dif in differs.items() if p not in (r, me) and dif == [r]}
        holders = (agree | {p for p, s in slices.items() if s.get(r) == mine[r]}) - {r}
        out.add(r if len(accusers) >= 2 and len(accusers) > len(holders) else d)
    return out - {me}


@dataclass
class NoShows:
    """Peers that were expected in a round and never became ready in its window: not waited for again
    until they show up ready (or sign a version this peer accepts)."""

    peers: set[str] = field(default_factory=set)

    def after_window(self, start: RoundStart) -> None:
        if start.window_closed:
            self.peers.update(start.missing)

    def seen(self, peers: Iterable[str]) -> None:
        self.peers.difference_update(peers)


ABSENT_MAX_SKIP = 64  # versions: the longest a ready peer that never joins goes without being waited for
ABSENT_MAX_PEERS = 10_000  # absentees remembered (a record from a fresh key costs its writer nothing)


@dataclass
class Absentees:
    """Ready peers that a group formed without, though this peer waited for them: not waited for again for a while.

    A record saying "ready" costs its writer nothing, and a leader waits for every ready peer its members wait for
    until the end of the matchmaking time; a peer that also follows the levels its ready peers claim moved up with
    them, a matchmaking time and a request's timeout a level. Ready records from keys that never join cost every
    round that much for as long as they were kept up. Now a peer missed at version v is not waited for (and its
    levels not followed) through version v + 1, nor in v's own redos; each further miss, once it was waited for
    again, multiplies that by 4 (1, 4, 16, then ``ABSENT_MAX_SKIP`` versions), and being in a group or signing a
    version this peer accepts ends it. It may still join whenever it comes: only the waiting is given up, so an
    honest peer whose request came late loses at most a group it was late for."""

    peers: dict[str, tuple[int, int]] = field(default_factory=dict)  # peer -> (misses, last version it is skipped in)

    def missed(self, peers: Iterable[str], version: int) -> list[str]:
        """Peers a group formed without at ``version``: the ones not already skipped there, now skipped."""
        new = []
        for p in peers:
            misses, until = self.peers.get(p, (0, -1))
            if version <= until:
                continue
            self.peers.pop(p, None)  # re-inserted last: the oldest entries go first when there are too many
            self.peers[p] = (misses + 1, version + min(4 ** misses, ABSENT_MAX_SKIP))
            new.append(p)
        while len(self.peers) > ABSENT_MAX_PEERS:
            self.peers.pop(next(iter(self.peers)))
        return new

    def waited_for(self, peer: str, version: int) -> bool:
        return version > self.peers.get(peer, (0, -1))[1]

    def seen(self, peers: Iterable[str]) -> None:
        for p in peers:
            self.peers.pop(p, None)


NEWCOMER_DEPTH = 32  # versions back whose signers count as known peers (``CertChain.recent_signers``)
NEWCOMER_MAX_GUARD = 16  # versions: the longest a peer leaves newcomers out after a newcomer spoiled its group
NEWCOMER_FORGET = 16  # versions without a spoil after which one strike is forgotten


def _strikes_after(count: int, last: int, version: int) -> int:
    """A strike count once one more comes at ``version``: the last one's (at version ``last``, -1 for none), less one
    forgotten per ``NEWCOMER_FORGET`` versions since, plus this one (``Newcomers``, ``Blamed``)."""
    if last >= 0:
        count = max(0, count - (version - last) // NEWCOMER_FORGET)
    return count + 1


@dataclass
class Newcomers:
    """Whether this peer takes *newcomers* (ready peers that signed none of the last ``NEWCOMER_DEPTH`` versions of
    its base's line) into its groups.

    In an open swarm a ready record costs its writer one key: an outsider that signed one for a fresh key on each
    round, joined a group and stalled its all-reduce spoiled about two groups a minute (red team: 12.7 commits a
    minute down to 4.1); leaving the stalled key out of its round's redos did not help, the next key was fresh. So a
    group that failed where a newcomer was to blame (or where nobody could be named) is a *strike*: newcomers are
    then left out of this version's redos and of the next 1, 4, then ``NEWCOMER_MAX_GUARD`` versions (4 ** (strikes
    - 1)). The first version after that takes newcomers again, on probation: another spoil adds a strike. One strike
    is forgotten per ``NEWCOMER_FORGET`` versions with none. An outsider with any number of keys so costs the swarm
    at most one spoiled attempt per ``NEWCOMER_MAX_GUARD`` + 1 versions, and an honest swarm without spoils never
    leaves anyone out. Its price: while an attack goes on, honest newcomers wait through the guard too."""

    strikes: int = 0
    until: int = -1  # the last version in which newcomers are left out
    last: int = -1  # the version of the last strike

    def admitted(self, version: int) -> bool:
        return version > self.until

    def spoiled(self, version: int) -> int:
        """A group with a newcomer to blame failed at ``version``: how many versions after it newcomers are left out
        (0 if they already are: a second failure in a guarded version adds no strike)."""
        if not self.admitted(version):
            return 0
        self.strikes, self.last = _strikes_after(self.strikes, self.last, version), version
        self.until = version + min(4 ** (self.strikes - 1), NEWCOMER_MAX_GUARD)
        return self.until - version


BLAMED_MAX_PEERS = 10_000  # known peers remembered as blamed (``Blamed``)


@dataclass
class Blamed:
    """Known peers (recent signers) that a failed group's checks named: left out of the round's redos (``suspects``),
    and from the second blame on, through the next 3, then 15, then at most ``NEWCOMER_MAX_GUARD`` versions too.

    A key that contributes cleanly once is known for ``NEWCOMER_DEPTH`` versions, and its spoils are no newcomer's:
    alternating a clean round with a stall, one key spoiled 6 groups in 200 s and never raised a strike (red team).
    A signature does not clear a blame (it costs one honest round); one blame is forgotten per ``NEWCOMER_FORGET``
    versions without one. An honest member that failed one group (killed, overloaded) loses only that round's redos:
    an earlier version of this guard made it a newcomer instead, and the newcomer guard then kept two honest peers
    out of 12 and 23 versions (red team)."""

    peers: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # peer -> (blames, last version out, last blame's)

    def blame(self, peer: str, version: int) -> int:
        """``peer`` failed a group on ``version``: how many versions after it it is left out."""
        count, until, last = self.peers.pop(peer, (0, -1, -1))
        count = _strikes_after(count, last, version)
        skip = min(4 ** (count - 1) - 1, NEWCOMER_MAX_GUARD)
        self.peers[peer] = (count, max(until, version + skip), version)  # re-inserted last: the oldest go first
        while len(self.peers) > BLAMED_MAX_PEERS:
            self.peers.pop(next(iter(self.peers)))
        return skip

    def left_out(self, peer: str, version: int) -> bool:
        return peer in self.peers and version <= self.peers[peer][1]


def newcomers_to_blame(group: Iterable[str], blamed: Iterable[str], known: set[str] | frozenset[str], me: str) -> list[str]:
    """The newcomers of a failed group that count as a strike (``Newcomers``): those blamed for it, or every newcomer
    in it when nobody could be named (a stall names no one where all its parts time out alike). Known peers to
    blame are no newcomers' fault: a group that failed on them alone is no strike."""
    newcomers = sorted(set(group) - set(known) - {me})
    blamed = set(blamed) - {me}
    if not blamed:
        return newcomers
    return sorted(blamed & set(newcomers))
