"""The verifying averager: an exact, canonical all-reduce of deltas whose reducers enforce the
manifest's rules on every member, and which serves this peer's store to other peers.

hivemind 1.1.12 reports success even when a member died mid all-reduce: a dead *reducer* leaves its
slice at each survivor's local values (``failed_size != 0``), a dead *sender* leaves a mixed average
(``banned_senders``). Both are caught here and returned with the step's result. A reducer also sees
every member's part of its slice and the weight it claims: a weight outside the manifest's rule, a
non-finite part, or a part longer than the round's bound bans that member from the all-reduce and
names it as an *offender* (the verdict says so, and this peer refuses it for the rest of its run).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import InvalidStateError
import functools
from functools import cached_property
import hashlib
import math
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable

import torch

import hivemind.averaging.averager as hivemind_averager
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES, AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import (
    CompressionInfo, Float16Compression, NoCompression, Uniform8BitQuantization,
)
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, aiter_with_timeout, anext, as_aiter, attach_event_on_finished, azip
from hivemind.utils.logging import get_logger
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from coldfusion_p2p.errors import WorkError
from coldfusion_p2p.membership import Admission
from coldfusion_p2p.strategies import Strategy, outliers
from coldfusion_p2p.swarm import streams
from coldfusion_p2p.swarm.gate import RefusalLog
from coldfusion_p2p.swarm.lane import (
    GRANT_TIMEOUT, RAW, LaneDialer, LanePart, LaneServer, as_message, decode_tensor, encode_tensor, exchange, listen_hosts,
    part_tensor, raw_part,
)
from coldfusion_p2p.swarm.node import peer_str
from coldfusion_p2p.swarm.transfer import serve_blob, split_blob_request


MAX_GROUP = 256  # members a verdict can list
HOLD_ALLOWANCE = 1.0  # seconds past a leader's declared start and a request's timeout a follower waits (``held_past``)
MAX_REDIRECTS = 8  # leaders one join request follows after the first (a disbanding leader names the next; ``guarded_join``)
PART_FIRST_READ_TIMEOUT = 10.0  # seconds a caller has to send the first message of a part
GROUP_SETUP_TIMEOUT = 30.0  # seconds a part waits for its group to be registered here
PART_SIZE_BYTES = DEFAULT_PART_SIZE_BYTES  # per part of the all-reduce: hivemind's, and every older peer's
# per part when every member's last all-reduce ran fast enough (``group_part_bytes``): a part costs a
# fixed amount of Python work in each averager (runner, futures, frames), and on fast links that, not
# the bytes, was the all-reduce's largest cost (bench/allreduce.py: 0.76 -> 0.58 s with 4 peers)
WIDE_PART_BYTES = 4 * PART_SIZE_BYTES
WIDE_MARGIN = 4.0  # a wide part must take at most 1/4 of the senders' timeout at the slowest member's last rate
# how a member of a wide group names the group in its first part message: the group id, this mark, and a
# digest of how it cut the vector (``CanonicalAllReduceRunner.layout``). A reducer that cut it otherwise
# answers BAD_GROUP_ID and takes nothing from it: no part of another shape is ever judged, and no one is
# named for a disagreement that a leader's different views of the group could cause
LAYOUT_MARK = b"|layout:"
LAYOUT_BYTES = len(LAYOUT_MARK) + 16
# what every member also says in the first part message of every exchange, in ``AveragingData.peer_id`` (a
# field hivemind 1.1.12 and older peers of this project never read): this mark and a digest of how it cut the
# vector, its modes included (``CanonicalAllReduceRunner.cut``). The sender says it itself, whatever the
# leader relayed, so no leader can switch the check off for peers that make it; a reducer whose own cut differs
# refuses the exchange as for ``LAYOUT_MARK``. A sender that says nothing is an older peer, judged as before
CUT_MARK = b"cut1:"
MIN_GROUP_ID = 16  # bytes: hivemind's leaders name groups with 20 random ones; a shorter name is refused as odd
LEADER_LOOKUP_INTERVAL = 0.25  # seconds between one peer's looks for a group leader (hivemind 1.1.12: back to back)
FIRST_LOOKUP_INTERVAL = 0.04  # seconds before its second look; each pause doubles up to LEADER_LOOKUP_INTERVAL
HANG_UP_WAIT = 5.0  # seconds a reducer keeps a p2pd stream open after its last answer, for the member to hang up
# seconds a reducer keeps a p2pd stream open after refusing it (a code, no average): closed at once, the stream was reset
# while the member's parts were still coming, and the reset overtook the code in 17 of 44 refusals here (the
# member saw "Connection reset by peer", and could not tell a refusal from a broken link)
REFUSAL_WAIT = 1.0
EARLY_START_POLL = 0.05  # seconds between a leader's looks at whether its group is complete (and at each follower it takes)
_PEER_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,60}$")
logger = get_logger(__name__)


def part_problem(part: torch.Tensor, bound: float, like: torch.Tensor | None = None) -> str | None:
    """Why a part of a delta (or of an average) is unacceptable: not of ``like``'s shape and dtype (the
    part this peer holds there), non-finite, or longer than ``bound``. Another shape would broadcast in
    the reducer's sum (one value counted over the whole part, past the bound); complex values broke it."""
    if like is not None and part.shape != like.shape:
        return f"sent a part of shape {list(part.shape)} where one of shape {list(like.shape)} belongs"
    if like is not None and part.dtype != like.dtype:
        return f"sent a part of {part.dtype} where {like.dtype} belongs"
    norm = float(torch.linalg.vector_norm(part))  # one float32 pass: NaN or Inf anywhere makes it non-finite
    if not math.isfinite(norm):
        if not torch.isfinite(part).all():
            return "sent NaN or Inf values"
        norm = float(part.double().norm())  # finite values whose squares overflow float32
    if norm > bound:
        return f"sent a part of norm {norm:.4g}, beyond the round's bound {bound:.4g}"
    return None


def part_violation(weight: float, part: torch.Tensor, rules: dict, like: torch.Tensor | None = None) -> str | None:
    """Why a member's part breaks the round's rules, or None. ``rules``: min_weight, max_weight, part_bound;
    ``like``: see ``part_problem``."""
    lo, hi = rules.get("min_weight", 0.0), rules.get("max_weight", math.inf)

    if not (math.isfinite(weight) and lo <= weight <= hi):
        return f"claimed weight {weight:.6g}, outside the manifest's rule [{lo:g}, {hi:g}]"
    if weight != int(weight):  # a count of examples: a fractional weight would also make sums order-dependent
        return f"claimed weight {weight:.6g}, not a whole number of examples"
    return part_problem(part, rules.get("part_bound", math.inf), like)


class StrategyPartReducer(TensorPartReducer):
    """Holds every sender's copy of the current part and reduces them with the round's fusion strategy.

    hivemind adds senders' parts into a float32 accumulator in arrival order, so the average's last
    bits depended on network timing: the same deltas gave a different B[v+1] run to run. Here the parts
    are kept (indexed by sender) until the part is complete and then reduced by ``strategy.reduce``
    in sender order: exact, order-free, and the same arithmetic as the central loop
    (``Strategy.reduce_all``). A robust strategy needs every member's values of a coordinate at once
    anyway. In groups of three or more, ``strategy.reduce_measured`` gives the same result and each
    sender's squared distance from it, added up in ``distances``.
    """

    def __init__(self, part_shapes, num_senders: int, strategy: Strategy):
        self.strategy = strategy
        self.parts: dict[int, tuple[torch.Tensor, float]] = {}
        self.distances = [0.0] * num_senders
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        """hivemind 1.1.12's, without its float32 accumulator: the parts are kept instead, and zeroing a
        fresh half megabyte for every part cost page faults for nothing (py-spy, bench/allreduce.py)."""
        self.parts = {}
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self.accumulator, self.denominator = None, 0.0

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.parts[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        # shielded: hivemind awaits the part's future bare, so a sender that hung up (its handler cancelled)
        # while it waited cancelled the future every sender shares; the part's last sender then failed on
        # ``set_result`` and was banned, and the slice waited until the all-reduce's timeout
        return await asyncio.shield(current_part_future)

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            order = sorted(self.parts)
            parts, weights = [self.parts[i][0] for i in order], [self.parts[i][1] for i in order]
            if len(parts) >= 3:  # ``outliers`` names no one in a smaller group: the distances are not needed there
                result, distances = self.strategy.reduce_measured(parts, weights)
                for i, d in zip(order, distances):
                    self.distances[i] += d
            else:
                result = self.strategy.reduce(parts, weights) if parts else torch.zeros(self.part_shapes[self.current_part_index])
            self.current_part_future.set_result(result)
            self.reset_accumulators()

    def finalize(self):
        if not self.finished.is_set():
            self.parts = {}
            if hasattr(self, "current_part_future"):
                self.current_part_future.cancel()
            self.finished.set()


class CanonicalAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose result is bit-identical on every member, with the round's rules.

    hivemind's runner has each reducer send back ``average - sender_part`` and each sender compute
    ``local + (average - local)``, which in floating point differs from ``average`` in the last bits,
    differently on each peer: even a clean round leaves members with different hashes. Here a
    reducer sends the average itself (compressed once, the same bytes to every sender, its own copy
    round-tripped through the same compression) and members copy it in place. A part whose reducer
    failed keeps the local values, as before, and is counted in ``failed_size``.

    ``rules`` (set before the run): every remote member's part is checked against them
    (``part_violation``); so is every averaged part a remote reducer sends back (an average of
    parts within the bound is within it). Offenders are kept in ``offenders``.
    """

    def __init__(self, *args, rules: dict | None = None, lanes: LaneDialer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rules = rules or {}
        self.lanes = lanes
        self.lane_peers: set[PeerID] = set()  # reducers this member reached over a direct lane
        self.exchanges: set[PeerID] = set()  # senders whose exchange this reducer took up (``_aggregate_parts``)
        self._channels: list = []
        self._averages_sent: dict = {}  # (part index, compression) -> the encoded average (_serialized_average)
        self.offenders: dict[PeerID, str] = {}
        self._served: set[PeerID] = set()  # senders whose whole share this reducer took (``_ban_sender``)
        self.ban_reasons: dict[PeerID, str] = {}  # sender -> why this reducer banned it (``_ban_sender``)
        self.tensor_part_container.return_deltas = False  # failed parts then hold local values, not zeros
        self.tensor_part_reducer = StrategyPartReducer(self.tensor_part_reducer.part_shapes, self.tensor_part_reducer.num_senders,
                                                       self.rules.get("strategy") or Strategy())
        container = self.tensor_part_container
        # each member's slice of the vector, in values (its parts are a run of the tensors flattened in order)
        self.slice_values = [sum(part.numel() for part, _ in parts) for parts in container._input_parts_by_peer]
        register = container.register_processed_part

        def checked_register(peer_index: int, part_index: int, part: torch.Tensor):
            if part_index != container._outputs_registered_by_peer[peer_index]:  # hivemind's own check, made before
                raise ValueError(f"part #{part_index} from peer #{peer_index} is out of turn")  # anything is written
            peer = self.ordered_peer_ids[peer_index]
            mine = container._input_parts_by_peer[peer_index][part_index][0]  # a view of the local tensor
            if peer != self.peer_id and part is not mine:
                problem = part_problem(part, self.rules.get("part_bound", math.inf), like=mine)
                if problem is not None:
                    self.offenders.setdefault(peer, f"as a reducer, {problem}")
                    part = mine  # this member's own values stand in, as for a reducer that failed,
                    container.failed_size += mine.numel()  # and are counted as its values are
            if part is not mine:  # the average goes straight into the local tensor: its own part there was sent
                mine.copy_(part)  # (and, as a reducer, reduced) before any average of it could come back
            register(peer_index, part_index, mine)

        container.register_processed_part = checked_register
        container.iterate_output_tensors = self._whole_tensors
        self.failed_reducers: set[PeerID] = set()
        self.failure_reasons: dict[PeerID, str] = {}  # reducer -> why this member's exchange with it failed
        register_failed = container.register_failed_reducer

        def noted_failed(peer_index: int):
            self.failed_reducers.add(self.ordered_peer_ids[peer_index])
            register_failed(peer_index)

        container.register_failed_reducer = noted_failed

    async def _whole_tensors(self):
        """hivemind 1.1.12's ``iterate_output_tensors`` without its copy: the averages are already in the local
        tensors (``checked_register``), so each tensor is yielded itself once all of its parts are in. hivemind
        gathered them with ``torch.cat`` and the averager then copied that in place: two passes over the model."""
        container = self.tensor_part_container
        assert not container._outputs_consumed, "output tensors are already iterated and no longer available."
        container._outputs_consumed = True
        peer_index = num_parts_processed = 0
        for tensor_index, tensor in enumerate(container.local_tensors):
            parts = 0
            while parts < container.num_parts_by_tensor[tensor_index]:
                if num_parts_processed >= container.num_parts_by_peer[peer_index]:
                    num_parts_processed = 0
                    peer_index += 1
                    continue
                if not container._output_parts_by_peer[peer_index]:
                    container._output_part_available[peer_index].clear()
                    await container._output_part_available[peer_index].wait()
                    if container.finished.is_set():
                        raise AllreduceException("All-reduce was terminated during iteration")
                container._output_parts_by_peer[peer_index].popleft()
                parts += 1
                num_parts_processed += 1
            yield tensor

    @cached_property
    def layout(self) -> bytes:
        """b"" for hivemind's 512 KiB parts (every older peer's); for wide parts ``LAYOUT_MARK`` and a digest of
        the members' order, the part size and each member's part count: how this member cut the vector (fixed
        once the runner exists: worked out once). Peers of the release before ``cut`` check only this."""
        if self.tensor_part_container.part_size_bytes == PART_SIZE_BYTES:
            return b""
        return LAYOUT_MARK + self._cut_digest()

    @cached_property
    def cut(self) -> bytes:
        """``CUT_MARK`` and a digest of how this member cut the vector, in every group: the members' order,
        each one's mode (an auxiliary member sends nothing, a client reduces nothing), the part size and each
        member's part count. Said in the first part message of each exchange (``AveragingData.peer_id``)."""
        return CUT_MARK + self._cut_digest(tuple(int(m.value) for m in self.modes))

    def _cut_digest(self, *more) -> bytes:
        """16 bytes of sha256 over the members' order, then ``repr`` of (part size, parts per member, *more):
        ``layout``'s without ``more``, as the release before ``cut`` computes it."""
        container = self.tensor_part_container
        digest = hashlib.sha256(b"".join(p.to_bytes() for p in self.ordered_peer_ids))
        digest.update(repr((container.part_size_bytes, tuple(container.num_parts_by_peer), *more)).encode())
        return digest.digest()[:LAYOUT_BYTES - len(LAYOUT_MARK)]

    def _get_peer_stub(self, peer: PeerID):
        return _LaneStub(self, peer, super()._get_peer_stub(peer))

    def finalize(self, *, cancel: bool = False, exception: BaseException | None = None):
        super().finalize(cancel=cancel, exception=exception)
        if cancel or exception is not None:  # a lane still open now belongs to an abandoned exchange. After a
            for channel in self._channels:  # clean finish each exchange reads its reducer's end, and closes itself
                channel.close()

    def _canonical(self, averaged_part: torch.Tensor) -> torch.Tensor:
        compression = self.tensor_part_container.compression
        if isinstance(compression, NoCompression):
            return averaged_part  # the wire changes nothing, and no one writes into parts or averages: no copy
        return decode_tensor(encode_tensor(averaged_part, compression.compression_type))

    async def _communicate_with_peer(self, peer_id: PeerID):
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id != self.peer_id:  # hivemind 1.1.12's exchange, decoding in place (see _generate_input_for_peer)
            container = self.tensor_part_container
            try:
                done_sending = asyncio.Event()
                inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
                stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
                if self.should_delay_results(self.peer_id):
                    await done_sending.wait()
                part_index, expected = 0, container.num_parts_by_peer[peer_index]
                over_p2pd = peer_id not in self.lane_peers  # a lane ends with the reducer's own end frame
                answers = aiter_with_timeout(stream, self.reducer_timeout)
                try:
                    async for msg in answers:
                        if msg.code != averaging_pb2.AVERAGED_PART:
                            raise AllreduceException(f"{peer_id} sent code {msg.code}")
                        if part_index >= expected:
                            raise AllreduceException(f"peer {peer_id} sent more than the {part_index} parts we expected")
                        # registers what the reducer sent: the average (checked against the bound by checked_register)
                        container.register_processed_part(peer_index, part_index, part_tensor(msg))
                        part_index += 1
                        if part_index == expected and over_p2pd:
                            break  # every average is in: this member hangs up, and the reducer waits for that
                            # before it closes its end of the p2pd stream (``FusionAverager.rpc_aggregate_part``)
                finally:
                    for opened in (answers, stream):
                        with contextlib.suppress(Exception):
                            await opened.aclose()
                if part_index != expected:
                    raise AllreduceException(f"peer {peer_id} sent {part_index} parts, but we expected {expected}")
            except BaseException as e:
                if isinstance(e, Exception):  # kept for the verdict's reason
                    self.failure_reasons[peer_id] = f"{type(e).__name__}: {str(e)[:160]}"
                container.register_failed_reducer(peer_index)
                raise
            return
        sender_index = self.sender_peer_ids.index(peer_id)
        for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
            # its own part goes through the wire's compression like every other member's: the reducer then
            # sees the same values for everyone, and the central loop can compute the same thing
            averaged_part = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, self._canonical(tensor_part), weight=self.weight)
            self.tensor_part_container.register_processed_part(peer_index, part_index, self._canonical(averaged_part))

    async def _generate_input_for_peer(self, peer_index: int):
        """hivemind 1.1.12's, encoding each part in place: its thread pool hand-off per 512 KiB part cost
        more CPU than the encoding itself (py-spy, bench/allreduce.py), and on few cores the pool runs
        nothing in parallel anyway."""
        container = self.tensor_part_container
        assert not container._inputs_consumed_by_peer[peer_index], "input parts of a given peer are already deallocated."
        container._inputs_consumed_by_peer[peer_index] = True
        # uncompressed or float16, a part is sent from the tensor's memory (or its float16 copy) on a lane (LanePart)
        raw = container.compression.compression_type in RAW
        for part_index, (part, info) in enumerate(container._input_parts_by_peer[peer_index]):
            first = {"code": averaging_pb2.PART_FOR_AVERAGING, "group_id": self.group_id + self.layout,
                     "peer_id": self.cut} if part_index == 0 else {}
            if raw and part.dtype == torch.float32:
                yield raw_part(part, container.compression.compression_type, weight=self.weight, **first)
            else:
                yield averaging_pb2.AveragingData(tensor_part=container.compression.compress(part, info), weight=self.weight, **first)
            await asyncio.sleep(0)  # the other exchanges go on meanwhile

    def _average_answer(self, part_index: int, averaged_part: torch.Tensor, compression):
        """The answer with the average of a part, made once for all the senders that asked in that compression
        (uncompressed: a ``LanePart``, sent raw on lanes and encoded once for p2pd streams)."""
        key = (part_index, compression)
        if key not in self._averages_sent:
            for old in [k for k in self._averages_sent if k[0] < part_index]:
                del self._averages_sent[old]  # every sender is at this part or past it
            if compression in RAW and averaged_part.dtype == torch.float32:
                answer = raw_part(averaged_part, compression, code=averaging_pb2.AVERAGED_PART)
            else:
                answer = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                     tensor_part=encode_tensor(averaged_part, compression))
            self._averages_sent[key] = answer
        return self._averages_sent[key]

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        sender = self.sender_peer_ids[sender_index]
        try:
            async for msg in stream:  # decoded here: a thread hand-off per part cost more than decoding it (py-spy)
                tensor_part, weight, part_compression = part_tensor(msg), msg.weight, msg.tensor_part.compression
                mine = self.parts_for_local_averaging  # this reducer's own parts: the shape and dtype each must have
                problem = (part_violation(weight, tensor_part, self.rules, like=mine[part_index]) if part_index < len(mine)
                           else f"sent more than the {len(mine)} parts of this reducer's share")
                if problem is not None:
                    self.offenders[sender] = problem
                    break  # banned below: its part is not aggregated, here or in any later part
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=weight)
                    part_index += 1
                except BannedException:
                    break  # this sender was banned: its part is no longer aggregated
                if part_index == self.tensor_part_reducer.num_parts:
                    self._served.add(sender)
                yield self._average_answer(part_index - 1, averaged_part, part_compression)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(sender, f"its exchange ended after {part_index} of {self.tensor_part_reducer.num_parts} parts")

    async def _ban_sender(self, peer_id: PeerID, why: str | None = None):
        """hivemind's, except for a sender whose whole share this reducer already took: hivemind bans a sender
        whenever its handler ends in an exception, and over p2pd a member hangs up as soon as it has every
        average, which could reach a reducer still finishing its handler (a ban then changes no value,
        only makes an honest member look like one that failed). Why each one was banned is kept in
        ``ban_reasons`` (the exception its handler ended on, if any), for the step's result and the logs."""
        if peer_id not in self._served:
            if peer_id not in self.ban_reasons:
                error = sys.exc_info()[1]
                if error is not None:
                    why = f"{type(error).__name__}: {str(error)[:120]}" + (f" ({why})" if why else "")
                elif why is None and peer_id not in self.active_senders:
                    why = f"it did not begin its exchange within {self.sender_timeout} s"
                self.ban_reasons[peer_id] = why or "banned"
            await super()._ban_sender(peer_id)


class _LaneStub:
    """The runner's stub for one reducer: its parts go over a direct lane (``swarm/lane.py``) when the
    reducer grants one and it can be reached, else over hivemind's p2pd stream."""

    def __init__(self, runner: CanonicalAllReduceRunner, peer: PeerID, stub):
        self.runner, self.peer, self.stub = runner, peer, stub

    async def rpc_aggregate_part(self, inputs):
        runner = self.runner
        channel = None
        if runner.lanes is not None:
            async def ask(group_id: bytes) -> bytes:
                return (await self.stub.rpc_open_lane(averaging_pb2.DownloadData(metadata=group_id))).metadata

            channel = await runner.lanes.open(self.peer, runner.group_id, ask, runner.tensor_part_container.part_size_bytes)
        if channel is None:
            return await self.stub.rpc_aggregate_part(_as_messages(inputs))
        runner._channels.append(channel)
        runner.lane_peers.add(self.peer)
        return exchange(channel, inputs)


async def _as_messages(messages):
    """Messages as a p2pd stream carries them (a ``LanePart`` encoded)."""
    try:
        async for message in messages:
            yield as_message(message)
    finally:  # ended with the stream, also when the stream stops early: whoever waits for the inputs stops waiting
        with contextlib.suppress(Exception):
            await messages.aclose()


def split_layout(group_id: bytes) -> tuple[bytes, bytes]:
    """(the group id, the layout it was named with: b"" for none) of a first part message's ``group_id``."""
    group_id = bytes(group_id)
    if len(group_id) > LAYOUT_BYTES and group_id[-LAYOUT_BYTES:].startswith(LAYOUT_MARK):
        return group_id[:-LAYOUT_BYTES], group_id[-LAYOUT_BYTES:]
    return group_id, b""


def link_rate(gathered: dict) -> float:
    """The bytes per second a member says its last clean all-reduce moved (``FusionAverager.step``); 0 for
    anything else: an older peer says nothing."""
    rate = gathered.get("rate") if isinstance(gathered, dict) else None
    return float(rate) if type(rate) in (int, float) and math.isfinite(rate) and rate > 0 else 0.0


def group_part_bytes(rates: list[float], members: int, sender_timeout: float, strategy: Strategy, compression: int) -> int:
    """The part size of one group's all-reduce: ``WIDE_PART_BYTES`` when every member's last rate (bytes
    per second, ``link_rate``) brings a wide part over each of its ``members - 1`` streams in at most
    1/``WIDE_MARGIN`` of the senders' timeout, else ``PART_SIZE_BYTES``. Every member works it out from
    the gathered data the leader relays, so the group agrees; a member's claim can only slow its group
    down, never make the slowest member's parts late (the slowest rate decides). A leader that shows
    members different data splits them: ``LAYOUT_MARK`` makes each exchange across the split fail
    without blame. A later version that decides otherwise must say its rate under another key.

    Only where the part size changes no value: a coordinate-wise strategy (``filtered_mean`` decides per
    part) and a wire that encodes each value alone (8-bit has a codebook per part)."""
    if strategy.per_part or compression not in RAW or members < 2 or not rates:
        return PART_SIZE_BYTES
    per_stream = min(rates) / (members - 1)
    return WIDE_PART_BYTES if per_stream * sender_timeout >= WIDE_MARGIN * WIDE_PART_BYTES else PART_SIZE_BYTES


class FusionAverager(DecentralizedAverager):
    """A DecentralizedAverager that (1) reports whether its own view of each all-reduce was clean and
    who broke the round's rules, (2) moves to a per-round matchmaking key with per-round rules,
    (3) refuses members it caught breaking them, and (4) serves the peer's store (bases,
    certificates, model files)."""

    def __init__(self, *args, store_root: str, admission: dict | None = None, label: str = "", lane: bool = True, lane_port: int = 0,
                 **kwargs):
        self._store_root = str(store_root)
        self._lane_on = lane  # serve and use direct lanes for the all-reduce's parts (``swarm/lane.py``)
        self._lane_port = lane_port  # 0: any free port
        self._lane_server: LaneServer | None = None
        self._lane_dialer: LaneDialer | None = None
        self._runners: dict[bytes, Any] = {}
        self._step_control = None  # the step being run (``_step``): its retries end once an all-reduce began
        self._rules: dict = {}
        self._excluded: set[str] = set()
        self._expect: frozenset[str] = frozenset()  # the ready peers this peer's round waits for (``_start_when_complete``)
        self._led_by: str | None = None  # whom this step's group followed (``guarded_join``); None: this peer led it
        self._join_expects: dict[str, tuple[Any, frozenset[str] | None]] = {}  # follower -> (its join request, whom it waits for)
        self._left_out: frozenset[str] = frozenset()  # newcomers this round leaves out (protocol.Newcomers): never taken in
        self._join_left_outs: dict[str, frozenset[str]] = {}  # follower -> the peers it leaves out (none of them is taken in)
        self._known: frozenset[str] = frozenset()  # the recent signers of this round's base line (protocol.Newcomers)
        # newcomers kept out on a follower's word alone, in this round and in the one before (``_binding_left_out``)
        self._word_kept_out: set[str] = set()
        self._word_kept_out_before: frozenset[str] = frozenset()
        self._complete_for: tuple[tuple, bool] | None = None  # (followers, whether complete): ``_group_complete``'s last answer
        self._follower_taken: asyncio.Event | None = None  # set as a follower is taken, in the averager's process
        # leaders this peer follows no more this round (peer id -> why): one that held it past the start it had declared,
        # sent it round a loop or to a stranger, answered its request with nothing, sent a group it is not in (or a
        # malformed one), or took it in and let it go twice (``guarded_join``). Before, each could do it at every attempt
        self._refused_leaders: dict[str, str] = {}
        self._held_round = ""
        self._let_go: dict[str, int] = {}  # leader -> times it took this peer in and let it go this round, no group, no redirect
        self._kept_waiting: dict[str, float] = {}  # leader -> seconds this round this peer waited for its answers that did not take it in
        # the leaders of the join requests the one being made is nested in: a leader that took this peer in and then
        # disbanded names the leader to follow, and hivemind asks that one from inside the same request, as deep as
        # it is sent (an outsider sending every member back to itself crashed each step with a RecursionError)
        self._join_chain: list[str] = []
        self._redirects = 0  # redirects this averager was sent on so far
        # set before the process starts: its handlers must refuse outsiders from their first call
        self._admission = Admission.from_state(admission) if admission else Admission()
        self._refusals = RefusalLog(label)
        self.link_rate = 0.0  # bytes per second of this peer's last clean all-reduce (``run_step``), said in ``step``
        super().__init__(*args, **kwargs)

    def step(self, *args, gather=None, **kwargs):
        """hivemind's, with this peer's last all-reduce rate in its gathered data (``group_part_bytes``)."""
        if isinstance(gather, dict):
            gather = {**gather, "rate": round(self.link_rate)}
        return super().step(*args, gather=gather, **kwargs)

    def _gate(self, what: str, context: P2PContext, token=None, presented: bool = True) -> bool:
        """True when the caller may go on; else the refusal is logged (rate-limited) on this peer."""
        if not self._admission.private:
            return True
        peer = peer_str(context.remote_id)
        why = self._admission.problem(peer, token) if presented else self._admission.knows(peer)
        if why is None:
            return True
        self._refusals(what, f"{peer[:12]}…", why)
        return False

    def _user_in(self, gather_blob: bytes) -> dict:
        """The gathered data a member put in its join request (``run_step``'s ``gather``); {} if malformed."""
        try:
            _, _, user = self.serializer.loads(gather_blob)
            user = self.serializer.loads(user)  # hivemind serializes the user's part once more on its own
            return user if isinstance(user, dict) else {}
        except Exception:  # noqa: BLE001 - a malformed request carries nothing
            return {}

    def _token_in(self, gather_blob: bytes):
        return self._user_in(gather_blob).get("token")

    def _peers_in(self, gather_blob: bytes, name: str) -> frozenset[str] | None:
        """A list of at most MAX_GROUP peer ids a member put under ``name`` in its join request; None if it is not one."""
        peers = self._user_in(gather_blob).get(name)
        if not isinstance(peers, list) or len(peers) > MAX_GROUP or not all(isinstance(p, str) and _PEER_RE.match(p) for p in peers):
            return None
        return frozenset(peers)

    def _expect_in(self, gather_blob: bytes) -> frozenset[str] | None:
        """The peers a member's round waits for, as it said in its join request; None if it said nothing usable."""
        return self._peers_in(gather_blob, "expect") or None  # (an empty list says nothing either)

    def _left_out_in(self, gather_blob: bytes) -> frozenset[str]:
        """The peers a member's round leaves out (newcomers, blamed peers), as it said in its join request."""
        return self._peers_in(gather_blob, "left_out") or frozenset()

    def _refused_as_followers(self) -> frozenset[str]:
        """The peers this leader takes in no follower of: those its round leaves out and those a follower it took does."""
        return self._left_out.union(*list(self._join_left_outs.values()))

    def _group_complete(self) -> bool:
        """Whether this leader holds everyone its group waits for (``_start_when_complete``); worked out
        again only when its followers change."""
        mm = self._matchmaking
        if not self._expect or not 0 < len(mm.current_followers) < MAX_GROUP:
            return False
        followers = tuple((p, id(r)) for p, r in mm.current_followers.items())
        if self._complete_for is not None and self._complete_for[0] == followers:
            return self._complete_for[1]
        members = {peer_str(self.peer_id)} | {peer_str(p) for p in mm.current_followers}
        complete = len(members) >= max(2, mm.min_group_size)
        wanted = set(self._expect)
        for peer, request in mm.current_followers.items():
            known = self._join_expects.get(peer_str(peer))  # parsed once, when it was accepted (rpc_join_group)
            if not complete or known is None or known[0] is not request or known[1] is None:
                complete = False  # a member that did not say whom it waits for: gather for the whole time
                break
            wanted |= known[1]
        # (a member's view may name peers another member leaves out)
        complete = complete and wanted - self._refused_as_followers() <= members
        self._complete_for = (followers, complete)  # holds until the followers or their views change (rpc_join_group)
        return complete

    async def _start_when_complete(self) -> None:
        """Begin the all-reduce as soon as this peer leads a *complete* group, not at the end of the matchmaking time.

        Every member says in its join request which ready peers its round waits for (``expect``).
        The group is complete when it holds each of them: the union of all its members' views, not
        the leader's alone. So a member that saw one more ready peer holds the group open until that
        peer has joined too, and a view that names a peer that never comes (or a member that names
        peers that do not exist) only brings back the whole matchmaking time.

        It begins at once, looked at again as each follower is taken (``rpc_join_group``). No better
        leader can still come for such a group: every peer that any member waits for follows this one,
        and hivemind lets a leader take only followers that declared no earlier than itself
        (BAD_EXPIRATION_TIME), so none of them would have led it. Only a peer that no member saw ready
        misses the group, as it would have missed it a moment later: also one that a member led before
        it followed this leader, and that hivemind sends on here (tens of ms). An earlier stop held every
        complete group for 0.2 s for such peers; that was most of the fusion phase's matchmaking time.
        """
        mm = self._matchmaking
        self._follower_taken = taken = asyncio.Event()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(taken.wait(), EARLY_START_POLL)
            taken.clear()
            if not mm.is_looking_for_group or mm.assembled_group.done() or mm.current_leader is not None:
                continue
            if not self._group_complete():
                continue
            try:
                async with mm.lock_request_join_group:
                    if mm.is_looking_for_group and not mm.assembled_group.done() and mm.current_leader is None and self._group_complete():
                        await mm.leader_assemble_group()
            except Exception as e:  # noqa: BLE001 - hivemind's own path still assembles at the end of the matchmaking time
                logger.warning(f"could not begin a complete group early ({type(e).__name__}: {str(e)[:120]})")
                return

    async def _step(self, *, step, future_for_init):
        self._step_control = step
        self._led_by = None
        early = asyncio.create_task(self._start_when_complete()) if not self.client_mode else None
        try:
            await super()._step(step=step, future_for_init=future_for_init)
        except InvalidStateError:
            # the caller gave up on this step (the swarm moved on) while hivemind was setting its result:
            # nothing is lost, and hivemind would print the error as a never-retrieved task's traceback
            if not step.cancelled():
                raise
        finally:
            self._step_control = None
            if early is not None:
                early.cancel()

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not self._gate("a request to join a group", context, self._token_in(request.gather)):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if peer_str(context.remote_id) in self._excluded:
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)  # it broke the rules before
            return
        if gather_problem(request.gather) is not None:  # it would spoil the group's all-reduce for every member
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        peer = peer_str(context.remote_id)
        theirs = self._binding_left_out(self._left_out_in(request.gather))
        # a follower that leaves out a member this leader took in already would not take part with it: the group would fail
        # (a peer's guard against newcomers is its own, and one whose guard was down let a newcomer in: red team)
        if not self._may_follow(peer) or theirs & {peer_str(p) for p in self._matchmaking.current_followers}:
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        try:
            async for response in super().rpc_join_group(request, context):
                if response.code == averaging_pb2.ACCEPTED:  # a follower now: whom it waits for, parsed once
                    self._join_expects[peer], self._complete_for = (request, self._expect_in(request.gather)), None
                    self._join_left_outs[peer] = theirs
                    self._word_kept_out |= theirs - self._left_out
                    if self._follower_taken is not None:
                        self._follower_taken.set()  # the group may be complete now (``_start_when_complete``)
                yield response
        finally:  # only current followers' views are kept
            if self._join_expects.get(peer, (None,))[0] is request:
                del self._join_expects[peer]
                self._join_left_outs.pop(peer, None)
                self._complete_for = None

    def _binding_left_out(self, theirs: frozenset[str]) -> frozenset[str]:
        """Of the peers a follower says it leaves out, those this leader refuses for it: newcomers to this leader (no
        recent signer of the base's line, ``_known``) and peers this leader leaves out itself.

        A leader whose guard against newcomers was down took in a newcomer that its guarded followers left out, and
        the newcomer spoiled the group (red team): so a follower's word keeps newcomers out. Not known peers: a
        follower's list is its own word, and a member that named every other known peer in it, and asked first, had
        the leader refuse them all (they formed another group: a split round, every round it joined). A known peer
        that a follower blamed (``protocol.Blamed``) and this leader did not is taken in; that follower still joins.

        Newcomers on a follower's word alone, only where this leader's known ready peers (and itself) can form a group
        without them, as an honest follower's own guard does: on v0, where everyone is new, a member that named every
        other ready peer and asked first split each round (red team). And not in two rounds in a row: a member that
        keeps a newcomer out of every round keeps it from ever signing a version, so a newcomer for ever. Past one
        round the newcomer is taken in, and if it spoils the group this leader's own guard goes up."""
        own = frozenset(p for p in theirs if p in self._left_out)
        me = peer_str(self.peer_id)
        known_ready = {me} | (self._expect & self._known if self._expect else self._known)
        if len(known_ready) < max(2, self._matchmaking.min_group_size):
            return own
        return own | frozenset(p for p in theirs if p not in self._known and p not in self._word_kept_out_before and p != me)

    def _may_follow(self, peer: str) -> bool:
        """Whether this peer, as a leader, takes ``peer`` in: a ready peer of its round (``_expect``), or one that a
        follower it took in waits for, where that follower is such a ready peer itself (its view is newer than this
        peer's, which was read when the attempt began). Any peer, where this round names none (a view too long
        for a group).

        hivemind's leader takes anyone that knows the round's key, and a stranger taken in spoiled the group's
        all-reduce for every member: its slice never averaged, or its parts never read until the reducers' timeout
        (red team, a plain hivemind node with a fresh identity after each refusal: 17 commits a minute down to 8).
        A follower refuses a stranger as its leader the same way (``guarded_join``). A newcomer the round leaves out
        (``left_out``) is refused even where a follower names it; a group another leader formed with it is not."""
        if peer in self._refused_as_followers():
            return False  # a peer this round, or a follower taken in, leaves out, whoever names it (protocol.Newcomers)
        if not self._expect or peer in self._expect:
            return True
        return any(peer in (seen or ()) for who, (_, seen) in list(self._join_expects.items()) if who in self._expect)

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A groupmate's parts over a p2pd stream (``_aggregate_parts``), answered in protobuf.

        After the last answer the stream stays open until the caller hangs up (this handler is then
        cancelled), for at most ``HANG_UP_WAIT`` seconds: closing it at once lost the end of the last
        average now and then, and the member then found a part missing ("sent 86 parts, but we
        expected 87": 4 of about 265 two-peer all-reduces over p2pd here, more on slow links). A caller
        refused with a code is waited for ``REFUSAL_WAIT`` seconds at most, for the same reason: closed at
        once, the stream was reset while its parts were still coming, and the caller read a reset instead
        of the code (17 of 44 refusals in ``test_members_shown_another_view_of_the_group...``, 0 of 33 since).

        The caller's parts are taken in a task of their own, and the answers queued for it: p2pd writes
        have no timeout, and a handler that waited to write an average to a caller that read none (a
        hostile or frozen one) read none of its next parts, so this reducer's slice, and every other
        member with it, waited for them until the all-reduce's timeout. Once its parts are all taken, a
        caller that takes no answer for the reducers' timeout (as long as it waits for each answer itself)
        has its stream closed, unbanned: every part of its share is in."""
        answers: asyncio.Queue = asyncio.Queue()  # at most one answer per part of this reducer's slice
        loop, writer = asyncio.get_running_loop(), asyncio.current_task()  # the task that writes what is yielded here
        patience = self.allreduce_kwargs.get("reducer_timeout") or self.allreduce_kwargs.get("sender_timeout") or HANG_UP_WAIT
        written, writing = 0, True  # answers taken by the caller so far; whether this handler still writes them

        def still_reading(seen: int) -> None:
            if writing:
                if written == seen:  # not one answer taken in ``patience`` s: the stream is closed
                    writer.cancel()
                else:
                    loop.call_later(patience, still_reading, written)

        async def take_parts():
            try:
                async for message in self._aggregate_parts(stream, context):
                    answers.put_nowait(message)
            finally:
                answers.put_nowait(None)
                if writing:
                    loop.call_later(patience, still_reading, written)

        taking = asyncio.create_task(take_parts())
        answered = False
        try:
            while (message := await answers.get()) is not None:
                answered = answered or message.code == averaging_pb2.AVERAGED_PART
                yield as_message(message)
                written += 1
            await taking  # its failure, if any, goes to the caller as hivemind sends it
        finally:
            writing = False
            if not taking.done():  # the caller hung up: its exchange ends here, as it did when it was read here
                taking.cancel()
                with contextlib.suppress(BaseException):
                    await taking
            elif not taking.cancelled():
                taking.exception()  # retrieved: a failure the caller can no longer be told of is not logged as lost
        if written:  # a silent caller is not waited for; a refused one only briefly (its code must reach it first)
            await self._wait_for_hang_up(HANG_UP_WAIT if answered else REFUSAL_WAIT)

    async def _wait_for_hang_up(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # cancelled when the member hangs up

    async def _aggregate_parts(self, stream: AsyncIterator[averaging_pb2.AveragingData | LanePart], context: P2PContext
                               ) -> AsyncIterator[averaging_pb2.AveragingData | LanePart]:
        """A groupmate's part, as hivemind 1.1.12 takes it, with every wait bounded and the group's
        future shielded: hivemind awaits that future bare, so a caller that hangs up while the group
        is being set up cancelled it, and this peer's own all-reduce then failed on ``set_result``."""
        try:
            request = await asyncio.wait_for(anext(stream), PART_FIRST_READ_TIMEOUT)
        except (asyncio.TimeoutError, StopAsyncIteration):
            return
        if not isinstance(request, (averaging_pb2.AveragingData, LanePart)):
            return
        group_id, layout = split_layout(request.group_id)
        if group_id not in self._running_groups:
            # the leader accepted us and began at once, and its answer with the group id is late
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pending_groups_registered.wait(), GROUP_SETUP_TIMEOUT)
        future, runner = self._running_groups.get(group_id), None
        if future is not None:
            try:
                runner = await asyncio.wait_for(asyncio.shield(future), self._allreduce_timeout or 60.0)
            except asyncio.TimeoutError:
                pass  # the group never started here
            except asyncio.CancelledError:
                if not future.cancelled():
                    raise  # our own caller's cancellation goes on up
                # else the group was dropped (shutdown)
        # members' tokens are checked when this peer takes up the group (``_outsiders``), before the
        # runner exists: so the check comes after the wait. A caller whose token was not checked is
        # refused, whatever group it names (the runner itself refuses members of other groups)
        if self._admission.private and not self._gate("a part of an all-reduce", context, presented=False):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        said = bytes(request.peer_id)  # b"" from a sender older than ``CUT_MARK``: judged as before
        cut_otherwise = runner is not None and (layout != runner.layout or (said != b"" and said != runner.cut))
        if cut_otherwise and context.remote_id in runner.sender_peer_ids:
            # this group, cut otherwise (``CUT_MARK``, ``LAYOUT_MARK``): none of its parts can be taken. Banned now, not after
            # the senders' timeout (as a sender that never came would be), and never named an offender
            await runner._ban_sender(context.remote_id, "it cut the vector otherwise")
        if runner is None or cut_otherwise:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        if context.remote_id in runner.exchanges:
            # a sender's runner opens one exchange with each reducer; hivemind's reducer counts the parts that
            # arrive, not who sent them, so a second stream's copies would complete a part without an honest
            # member's, and that member's late part would get it banned: refused, and nothing taken from it
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        runner.exchanges.add(context.remote_id)
        (request.meta if isinstance(request, LanePart) else request).group_id = group_id  # what hivemind's runner compares
        async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def add_p2p_handlers(self, p2p, wrapper=None, *, namespace=None, balanced=False) -> None:
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)
        from coldfusion_p2p.swarm.reach import DIAL_BACK, DialBackServer

        streams.set_member_check(self._in_a_group)  # members' parts do not share the strangers' budget for long messages

        await p2p.add_binary_stream_handler(DIAL_BACK, DialBackServer().handle)  # "can you dial me?" for joiners
        if self._lane_on and self._lane_server is None:
            # a reducer gives up writing to a sender that stopped reading after the senders' own timeout: that
            # sender's stream then ends and it is banned, before the others' patience with this reducer runs out
            server = LaneServer(self._serve_lane, WIDE_PART_BYTES, write_timeout=self.allreduce_kwargs.get("sender_timeout"))
            try:
                await server.start(listen_hosts(await p2p.get_visible_maddrs()), self._lane_port)
                self._lane_server = server
            except Exception as e:  # noqa: BLE001 - without a lane, parts go over p2pd as before
                logger.warning(f"no direct lane for the all-reduce ({type(e).__name__}: {str(e)[:120]}); parts go over p2pd")

    def _in_a_group(self, peer: PeerID) -> bool:
        """Whether ``peer`` is a member of a group this peer runs an all-reduce with, a follower it took in, or a ready peer
        of the round it waits for (``streams.set_member_check``)."""
        if any(peer in runner.ordered_peer_ids for runner in list(self._runners.values())):
            return True
        name = peer_str(peer)
        return name in self._join_expects or name in self._expect

    async def rpc_open_lane(self, request: averaging_pb2.DownloadData, context: P2PContext) -> averaging_pb2.DownloadData:
        """A lane grant (``swarm/lane.py``) for the caller, a member of this peer's group ``request.metadata``;
        an empty answer refuses it, and the caller sends its parts over p2pd."""
        group_id = request.metadata
        if self._lane_server is None or not 0 < len(group_id) <= 64 or peer_str(context.remote_id) in self._excluded:
            return averaging_pb2.DownloadData()
        if self._expect and not self._in_a_group(context.remote_id):  # a stranger's call waits for no group (red team)
            return averaging_pb2.DownloadData()
        if group_id not in self._running_groups:  # the leader's answer with the group id may still be on its way here
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pending_groups_registered.wait(), GRANT_TIMEOUT / 2)
        future = self._running_groups.get(group_id)
        if future is None:
            return averaging_pb2.DownloadData()
        try:  # the runner exists once this peer has checked the group's members (``_aggregate_with_group``)
            runner = await asyncio.wait_for(asyncio.shield(future), GRANT_TIMEOUT / 2)
        except asyncio.CancelledError:
            if future.cancelled():  # the group was dropped here
                return averaging_pb2.DownloadData()
            raise  # the caller hung up
        except Exception:  # noqa: BLE001 - not set up in time, or failed: no lane
            return averaging_pb2.DownloadData()
        if context.remote_id not in runner.sender_peer_ids or not self._gate("a lane", context, presented=False):
            return averaging_pb2.DownloadData()
        return averaging_pb2.DownloadData(metadata=self._lane_server.grant(context.remote_id, group_id,
                                                                           runner.tensor_part_container.part_size_bytes))

    async def _serve_lane(self, peer: PeerID, group_id: bytes, messages) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A lane's messages, taken as a p2pd stream from ``peer`` is: the same handler and checks."""
        first = await asyncio.wait_for(anext(messages), PART_FIRST_READ_TIMEOUT)
        if split_layout(first.group_id)[0] != group_id:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        context = P2PContext(handle_name="cfp2p-lane", local_id=self.peer_id, remote_id=peer)
        async for message in self._aggregate_parts(achain(as_aiter(first), messages), context):
            yield message  # a LanePart's tensor goes out raw

    async def rpc_download_state(self, _request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not self._gate("a state download", context, presented=False):
            return
        async for message in super().rpc_download_state(_request, context):
            yield message

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """The base class's all-reduce (hivemind 1.1.12) with the canonical runner, kept so its view can be checked."""
        group_id = group_info.group_id if group_id is None else group_id
        if self._lane_on and self._lane_dialer is None:
            self._lane_dialer = LaneDialer(self._p2p, WIDE_PART_BYTES)
        compression = kwargs.get("compression")
        kwargs["part_size_bytes"] = group_part_bytes(
            [link_rate(self._user_in(blob)) for blob in group_info.gathered], len(group_info.peer_ids),
            kwargs.get("sender_timeout") or 0.0, self._rules.get("strategy") or Strategy(),
            getattr(compression, "compression_type", None))
        runner = CanonicalAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            rules=dict(self._rules),
            lanes=self._lane_dialer,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        future = self._running_groups[group_id]
        if future.cancelled():  # cannot happen through our handler; a cancelled future must not end the step
            future = self._running_groups[group_id] = asyncio.get_running_loop().create_future()
        future.set_result(runner)
        self._runners[group_id] = runner
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            if averaged is not tensor:  # the runner writes the averages in place (``_whole_tensors``)
                tensor.copy_(averaged)
            self.last_updated = get_dht_time()
            self._state_updated.set()

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        """Run the all-reduce and return the gathered data with this member's verdict on it.

        A failed all-reduce is returned as an unclean result rather than raised: hivemind would
        otherwise retry it on the same key while other members of the group move on to verify.
        """
        self._runners.pop(group_info.group_id, None)
        group = [peer_str(p) for p in group_info.peer_ids]
        error = ""
        excluded = sorted(set(group) & self._excluded)
        oversized = len(group) > MAX_GROUP
        outsiders = self._outsiders(group_info) if self._admission.private and not oversized else []
        if oversized:
            gathered, error = {}, "the leader formed a group this protocol cannot record (too large)"
        elif outsiders:  # a leader put peers without a valid token in the group: take no part
            gathered, error = {}, f"the group includes {len(outsiders)} peer(s) without a valid membership token"
        elif excluded:  # a group led by a peer we caught before: take no part, say why
            gathered, error = {}, f"the group includes {len(excluded)} peer(s) that broke the rules before"
        elif (len(group) > MAX_GROUP or not all(_PEER_RE.match(p) for p in group) or split_layout(group_info.group_id)[1]
              or len(group_info.group_id) < MIN_GROUP_ID):
            # (a group id that ends like a layout's name would be cut short by every reducer: ``split_layout``)
            gathered, error = {}, "the leader formed a group this protocol cannot record (too large, odd peer ids, or an odd group id)"
        elif len(set(group)) != len(group):  # one peer in two places: two exchanges with it would serve one slice
            gathered, error = {}, "the leader formed a group that names a peer twice"
        else:
            # the runner writes averages into the tensors as they come, and this step's inputs are not kept
            # (a copy cost a pass over the model every round): hivemind must not retry this step on them
            if self._step_control is not None:
                self._step_control._allow_retries = False  # hivemind 1.1.12's StepControl: what its retry checks
            try:
                gathered = await super()._aggregate_with_group(self._even_split(group_info), min_vector_size, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the all-reduce makes this view unclean
                gathered, error = {}, f"{type(e).__name__}: {str(e)[:160]}"
        runner = self._runners.pop(group_info.group_id, None)
        failed = runner.tensor_part_container.failed_size if runner is not None else -1
        banned = sorted(peer_str(p) for p in runner.banned_senders) if runner is not None else []
        offenders = {peer_str(p): why for p, why in runner.offenders.items()} if runner is not None else {}
        far = {}
        if runner is not None and runner.tensor_part_reducer.num_parts > 0:  # this reducer's view of who pulled away
            reducer = runner.tensor_part_reducer
            far = outliers({peer_str(p): reducer.distances[i] for i, p in enumerate(runner.sender_peer_ids)})
        return {
            "gathered": {peer_str(p): v for p, v in gathered.items()},
            "group": group,
            "group_id": hashlib.sha256(group_info.group_id).hexdigest(),  # whatever the leader chose, a fixed-size name
            "clean": runner is not None and not error and failed == 0 and not banned and not offenders,
            "failed_size": failed,
            "banned": banned,
            "ban_reasons": {peer_str(p): why for p, why in runner.ban_reasons.items()} if runner is not None else {},
            "offenders": offenders,
            "outliers": far,
            "failed_reducers": sorted(peer_str(p) for p in runner.failed_reducers) if runner is not None else [],
            "failure_reasons": {peer_str(p): why for p, why in runner.failure_reasons.items()} if runner is not None else {},
            "reduced_parts": runner.tensor_part_container.num_parts_by_peer[group_info.peer_ids.index(self.peer_id)] if runner is not None else 0,
            "leader": self._led_by or peer_str(self.peer_id),  # who formed the group: a member's word, for the logs
            "lanes": sorted(peer_str(p) for p in runner.lane_peers) if runner is not None else [],
            # reducers of a slice whose lane this member, using lanes, could not use: their port is closed, or they serve none
            "lane_missed": sorted(peer_str(p) for p, n in zip(runner.ordered_peer_ids, runner.slice_values)
                                  if n > 0 and p != self.peer_id and p not in runner.lane_peers)
            if runner is not None and self._lane_on else [],
            "part_bytes": runner.tensor_part_container.part_size_bytes if runner is not None else 0,
            "slices": [[peer_str(p), n] for p, n in zip(runner.ordered_peer_ids, runner.slice_values)] if runner is not None else [],
            "error": error,
        }

    def _outsiders(self, group_info) -> list[str]:
        """Members of the group whose gathered data carries no token that admits them (each one is remembered,
        so that their parts are accepted in the all-reduce that follows)."""
        out = []
        for peer, blob in zip(group_info.peer_ids, group_info.gathered):
            who = peer_str(peer)
            if who != peer_str(self.peer_id) and self._admission.problem(who, self._token_in(blob)) is not None:
                out.append(who)
        return out

    def _even_split(self, group_info):
        """The same group with every member's claimed bandwidth set to 1: a member's share of the vector to
        reduce (and so the slice whose average it decides) must not be its own choice."""
        entries = []
        for blob in group_info.gathered:
            bandwidth, mode, user = self.serializer.loads(blob)
            entries.append(self.serializer.dumps((1.0, mode, user)))
        return type(group_info)(group_info.group_id, group_info.peer_ids, tuple(entries))

    def run_step(self, weight: float, gather: dict, timeout: float, give_up=None, on_allreduce=None) -> tuple[dict | None, float, float, str]:
        """One all-reduce: (result or None, matchmaking seconds, all-reduce seconds, error text).

        ``give_up()`` is asked every couple of seconds while still matchmaking; True cancels the step.
        ``on_allreduce()`` is called once when the group is formed and the all-reduce begins.
        """
        start = time.perf_counter()
        t_allreduce = None
        last_check = start
        died = False
        try:
            control = self.step(weight=weight, gather=gather, timeout=timeout, allow_retries=True, wait=False)
            while not control.done() and not died:
                if control.stage == AveragingStage.RUNNING_ALLREDUCE:
                    t_allreduce = time.perf_counter()
                    if on_allreduce is not None:
                        on_allreduce()
                    break  # nothing is asked from here on: wait for the result itself, not in 20 ms steps
                if time.perf_counter() - last_check > 2.0:
                    last_check = time.perf_counter()
                    died = not self.is_alive()
                    if give_up is not None and control.stage == AveragingStage.LOOKING_FOR_GROUP and give_up() \
                            and control.stage == AveragingStage.LOOKING_FOR_GROUP:  # give_up() may read the DHT a while
                        control.cancel()
                time.sleep(0.02)
            while not died:  # the step ends itself (hivemind's timeouts), unless its process is gone
                try:
                    result = control.result(timeout=2.0)  # woken as soon as it ends
                    break
                except TimeoutError:
                    if control.done():
                        raise  # the step's own outcome
                    died = not self.is_alive()
            error = ""
        except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - hivemind raises many kinds (a step it ended
            # on asyncio's CancelledError passes that on, and it is no Exception); each means "no result this time"
            result, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if died:  # nothing this peer does can go on: no later step, lock or round call would ever be answered
            raise WorkError(f"the averager process ended unexpectedly (exit code {self.exitcode}); this peer cannot take part "
                            "in rounds any more: start it again")
        end = time.perf_counter()
        t_allreduce = t_allreduce or end
        self.link_rate = self._rate_of(result, end - t_allreduce)
        return result, t_allreduce - start, end - t_allreduce, error

    def _rate_of(self, result: dict | None, seconds: float) -> float:
        """Bytes per second this peer sent in a clean all-reduce (its 2(P-1)/P of the vector on the wire),
        over the whole all-reduce; 0 after anything else, so that the next group uses the usual parts."""
        if not result or not result.get("clean") or seconds <= 0 or len(result.get("group") or ()) < 2:
            return 0.0
        members = len(result["group"])
        wire = RAW.get(getattr(self.allreduce_kwargs.get("compression"), "compression_type", None))
        if wire is None:
            return 0.0
        values = sum(t.numel() for t in self._averaged_tensors)
        # a member that reduced no slice (a client) sent its whole vector, and answered no one
        share = 2 * (members - 1) / members if result.get("reduced_parts") else 1.0
        return share * values * wire.itemsize / seconds

    async def _shutdown(self, timeout: float | None) -> None:
        # Ctrl+C in a terminal reaches p2pd too, and it may be gone before we unregister our
        # handlers: hivemind's _shutdown then dies with a traceback. Nothing is left to unregister.
        with contextlib.suppress(Exception):
            if not self.client_mode:
                await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        if self._lane_server is not None:
            with contextlib.suppress(Exception):
                await self._lane_server.close()
        # hivemind 1.1.12 calls ``finalize`` on each entry here, but the entries are futures of runners, not runners:
        # stopping a peer while its group ran printed an AttributeError traceback (red team 6)
        for future in list(self._running_groups.values()):
            with contextlib.suppress(Exception):
                if future.done() and not future.cancelled() and future.exception() is None:
                    future.result().finalize(cancel=True)
                else:
                    future.cancel()

    # --- per-round settings, called through the control pipe ------------------------------------
    def set_round(self, group_prefix: str, target_group_size: int | None, min_group_size: int, rules: dict | None = None,
                  excluded: list[str] | None = None, expect: list[str] | None = None, left_out: list[str] | None = None,
                  known: list[str] | None = None) -> None:
        """Move to a round's matchmaking key, with its rules (weights, part bound) and the peers to refuse.

        ``expect``: the ready peers this round waits for (this peer among them). As a leader, this peer
        begins once its group holds them and every member's own ``expect`` (which each member must also
        pass in ``run_step``'s gather): see ``_start_when_complete``. Without it, the whole matchmaking time.
        ``left_out``: newcomers this peer neither takes in as a leader nor waits for, though another member may (a
        group that holds one is still joined: refusing it would fail the honest members' attempt too).
        ``known``: the recent signers of the round's base line; a follower's own ``left_out`` keeps none of them out
        of this peer's group unless this peer leaves it out too (``_binding_left_out``)."""
        future = MPFuture()
        self._outer_pipe.send(("_set_round", [], dict(group_prefix=group_prefix, target=target_group_size, min_size=min_group_size,
                                                      rules=rules or {}, excluded=list(excluded or ()), expect=list(expect or ()),
                                                      left_out=list(left_out or ()), known=list(known or ()), future=future)))
        future.result()

    async def _set_round(self, group_prefix: str, target: int | None, min_size: int, rules: dict, excluded: list[str],
                         future: MPFuture, expect: list[str] | None = None, left_out: list[str] | None = None,
                         known: list[str] | None = None):
        mm = self._matchmaking
        mm.group_key_manager.prefix = group_prefix
        # the leader's cap only: the key manager's copy must stay None, since hivemind 1.1.12 draws
        # the next key's bits with rng.sample(range(target), group size), which raises for a
        # follower whose own count is smaller than the group its leader formed
        mm.target_group_size = mm.potential_leaders.target_group_size = target
        mm.group_key_manager.target_group_size = None
        mm.min_group_size = min_size
        self._rules, self._excluded = dict(rules), set(excluded)
        expect = list(expect or ())
        self._expect = frozenset(expect) if 0 < len(expect) <= MAX_GROUP else frozenset()
        self._left_out, self._known = frozenset(left_out or ()), frozenset(known or ())
        self._join_expects, self._join_left_outs, self._complete_for = {}, {}, None
        held_round = group_prefix.rsplit("_x", 1)[0]  # the round (base) without its redo counter
        if held_round != self._held_round:
            self._held_round, self._refused_leaders, self._let_go, self._kept_waiting = held_round, {}, {}, {}
            self._word_kept_out_before, self._word_kept_out = frozenset(self._word_kept_out), set()
        if not getattr(mm, "_cfp2p_guarded", False):  # never follow a leader this peer caught breaking the rules
            join_leader = mm._request_join_group

            async def guarded_join(leader: PeerID):
                who = peer_str(leader)
                # a leader that sent this peer on is not counted as letting it go (``_let_go``), wherever it sent it
                self._redirects += bool(self._join_chain)
                if who in self._excluded or who in self._admission.revoked or who in self._refused_leaders:
                    return None  # as if it had turned us down: matchmaking moves on to the next leader
                if leader in mm.current_followers:  # it follows this peer already: it would only say so, while
                    return None  # this peer, asking, could take no one else's request
                chain = self._join_chain
                # Only a ready peer of this round leads this peer. hivemind asks any peer that declared itself at the
                # round's key, and a stranger declaring itself earlier than everyone could hold every member, send it
                # round in a loop, or hand each member a group of its own (red team: no commit at all). An honest leader
                # is a ready peer, and one sent on to is the leader the sender joined itself: never one this request
                # followed already, and never deeper than a few
                stranger = bool(self._expect) and who not in self._expect
                if chain and (stranger or who in chain or len(chain) >= MAX_REDIRECTS):
                    why = ("whom it had followed already" if who in chain else "past the redirects it follows"
                           if len(chain) >= MAX_REDIRECTS else "not a ready peer of this round")
                    self._refuse_leader(chain[-1], f"it sent this peer on to {who[:12]}…, {why}")
                    return None  # the outer request then ends with no group
                if stranger:
                    return None
                if not mm.is_looking_for_group or mm.current_leader is not None:
                    return await join_leader(leader)  # hivemind's own checks of this peer's state: its errors are its own
                formed, redirects = [], self._redirects

                async def follow():
                    group = await join_leader(leader)  # (a leader that sends this peer on calls this again, deeper)
                    if group is not None:
                        formed.append(group)
                        if self._led_by is None:  # the deepest call's, the leader this peer followed in the end; noted
                            self._led_by = who  # here, in the request's own task: the step stops it once a group is formed
                    return group

                deadline = None if chain else held_past(mm, leader)
                taken = asyncio.create_task(mm.was_accepted_to_group.wait()) if not chain else None
                asked = time.monotonic()
                chain.append(who)
                try:
                    # a redirect: the first request's deadline covers the leaders it is sent on to
                    return await (follow() if deadline is None else self._join_until(follow(), deadline))
                except Exception as e:  # noqa: BLE001 - whatever a leader's answers break in hivemind's follower (asserts that
                    # loop the step at once, parsing): that leader is not asked again this round, the step goes on
                    self._refuse_leader(who, f"its answer broke this peer's request ({type(e).__name__}: {str(e)[:80]})")
                    return None
                finally:
                    chain.pop()
                    if taken is not None:
                        took = taken.done() and not taken.cancelled()
                        taken.cancel()
                        if not formed and who not in self._refused_leaders:
                            if not took:  # a no (or none): an honest leader says it at once, and this peer can take
                                # no one's request while it waits for it; a leader declaring itself first at every look
                                # and answering no just before the timeout held every step to the whole matchmaking time
                                self._kept_waiting[who] = self._kept_waiting.get(who, 0.0) + time.monotonic() - asked
                                if self._kept_waiting[who] >= 0.5 * mm.request_timeout:
                                    self._refuse_leader(who, f"it kept this peer waiting {self._kept_waiting[who]:.1f}s "
                                                        "for answers that did not take it in")
                            elif self._redirects == redirects and (not self._expect or len(self._expect) >= max(2, mm.min_group_size)):
                                # (an honest leader lets its followers go when its group is short of min_group_size at its
                                # start: when the ready peers this peer waits for are fewer than that, its group could not
                                # be complete, and the let-go is no evidence: counted, two honest peers that redid without
                                # a third refused each other for the rest of the round, and it never formed again)
                                self._let_go[who] = self._let_go.get(who, 0) + 1
                                if self._let_go[who] >= 2:
                                    self._refuse_leader(who, "it took this peer in and let it go twice with no group")

            assemble = mm.follower_assemble_group

            async def checked_assemble(leader: PeerID, msg: averaging_pb2.MessageFromLeader):
                problem = self._group_problem(leader, msg)
                if problem is not None:  # hivemind asserts a little of it, and a failed assert retried the step at once
                    self._refuse_leader(peer_str(leader), f"it sent {problem}")
                    return None  # no group from this leader: the request ends, matchmaking goes on
                return await assemble(leader, msg)

            mm.follower_assemble_group = checked_assemble
            mm._request_join_group, mm._cfp2p_guarded = guarded_join, True
            potential = mm.potential_leaders
            potential._update_queue_periodically = lambda key_manager: _paced_leader_lookups(potential, key_manager)
            _background_withdrawals(mm.group_key_manager)
        future.set_result(None)

    async def _join_until(self, join: Awaitable, deadline: float):
        """``join`` (a request to a leader, and to any it sends this peer on to), given up at ``deadline`` (DHT time)
        if no group came of it by then. The leader holding this peer at that moment is not asked again this round."""
        task = asyncio.ensure_future(join)
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - get_dht_time()))
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            return task.result()
        holder = self._join_chain[-1]  # the deepest leader this peer was sent on to
        task.cancel()
        try:
            group = await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this step itself was cancelled meanwhile
            group = None
        if group is None:  # (one that came just as it was given up is kept)
            self._refuse_leader(holder, "it held this peer past the start it had declared")
        return group

    def _group_problem(self, leader: PeerID, msg: averaging_pb2.MessageFromLeader) -> str | None:
        """What is wrong with the group a leader's BEGIN_ALLREDUCE hands this peer, None if nothing: its size, its
        ids, this peer and the leader in it once each, this peer's own gathered data unchanged, every member's parsable."""
        mm = self._matchmaking
        ids = list(msg.ordered_peer_ids)
        if not max(2, mm.min_group_size or 2) <= len(ids) <= MAX_GROUP:
            return f"a group of {len(ids)}"
        if len(msg.gathered) != len(ids) or not 0 < len(msg.group_id) <= 64 or not all(map(peer_id_bytes_ok, ids)):
            return "a malformed group"
        me = self.peer_id.to_bytes()
        if len(set(ids)) != len(ids) or me not in ids or leader.to_bytes() not in ids:
            return "a group that leaves this peer or itself out, or lists a member twice"
        if mm.step_control is None or msg.gathered[ids.index(me)] != mm.step_control.data_for_gather:
            return "a group with this peer's own gathered data changed"
        problem = next(filter(None, map(gather_problem, msg.gathered)), None)
        return f"a group with {problem}" if problem else None

    def _refuse_leader(self, who: str, why: str) -> None:
        """Follow ``who`` no more this round (``_refused_leaders``), and say why once."""
        if who not in self._refused_leaders:
            self._refused_leaders[who] = why
            logger.warning(f"not following {who[:12]}… as a leader again this round: {why}")

    def refused_leaders(self) -> dict[str, str]:
        """The leaders this peer follows no more this round, each with why (``_refuse_leader``). hivemind's logger
        says so only at WARNING, which a ``cfp2p`` command does not show: the contributor reports them as events."""
        future = MPFuture()
        self._outer_pipe.send(("_get_refused_leaders", [], dict(future=future)))
        return future.result(timeout=10.0)

    async def _get_refused_leaders(self, future: MPFuture):
        future.set_result(dict(self._refused_leaders))

    def set_admission(self, state: dict, label: str = "") -> None:
        """Who may call this averager (``membership.Admission.state()``); ``label`` prefixes its refusal lines."""
        future = MPFuture()
        self._outer_pipe.send(("_set_admission", [], dict(state=dict(state), label=label, future=future)))
        future.result()

    async def _set_admission(self, state: dict, label: str, future: MPFuture):
        fresh = Admission.from_state(state)
        if (fresh.mode, fresh.swarm, fresh.authority) == (self._admission.mode, self._admission.swarm, self._admission.authority):
            self._admission.revoked = fresh.revoked  # keep the tokens seen so far
        else:
            self._admission = fresh
        self._refusals.label = label
        future.set_result(None)

    # --- serving bases, certificates and model files -------------------------------------------
    async def rpc_fetch_blob(self, request: averaging_pb2.DownloadData, context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        name, token = split_blob_request(request.metadata)
        if not self._gate(f"a download of {name[:40]!r}", context, token):
            yield averaging_pb2.DownloadData(metadata=b"refused: no valid membership token")
            return
        async for msg in serve_blob(Path(self._store_root), name):
            yield msg


def peer_id_bytes_ok(raw: bytes) -> bool:
    """Whether ``raw`` is a libp2p peer id's bytes: a sha256 multihash (RSA keys, hivemind's) or an identity one
    (small keys such as ed25519)."""
    return (len(raw) == 34 and raw[:2] == b"\x12\x20") or (len(raw) >= 2 and raw[0] == 0 and raw[1] <= 42 and len(raw) == raw[1] + 2)


_MODES = frozenset(m.value for m in AveragingMode)  # hivemind's averaging modes, as gathered data carries them


def gather_problem(blob: bytes) -> str | None:
    """What is wrong with a member's gathered data as hivemind makes it (``[bandwidth, mode, user bytes]``, each part
    msgpack), None if nothing. Malformed, it spoiled the all-reduce of every group it was in, and no one was blamed."""
    try:
        bandwidth, mode, user = MSGPackSerializer.loads(blob)
        if bandwidth is not None and (type(bandwidth) not in (int, float) or not math.isfinite(bandwidth) or bandwidth < 0):
            return "a malformed bandwidth"
        if type(mode) is not int or mode not in _MODES or not isinstance(user, bytes):
            return "a malformed mode or user data"
        MSGPackSerializer.loads(user)
    except Exception:  # noqa: BLE001 - whatever does not parse
        return "gathered data that does not parse"
    return None


def held_past(mm, leader: PeerID) -> float | None:
    """DHT time by which ``leader`` must have begun its group, or let this peer go: the latest start it declared, as
    this peer's search found it, then a request's timeout (an honest leader still waiting at its start for another
    leader's first answer begins once that comes) and ``HOLD_ALLOWANCE``. hivemind's follower waits for its own
    declared start instead, so a leader declaring itself earlier than everyone could hold each member that long
    at every attempt. None: no declaration of it was found (nothing to hold it to)."""
    declared = [expiration for peer, expiration in mm.potential_leaders.past_attempts if peer == leader]
    return max(declared) + mm.request_timeout + HOLD_ALLOWANCE if declared else None


async def _paced_leader_lookups(leaders, key_manager) -> None:
    """hivemind 1.1.12's ``PotentialLeaders._update_queue_periodically``, at most one lookup per ``LEADER_LOOKUP_INTERVAL``.

    hivemind asks for a new look whenever its queue holds no earlier leader: for the peer that is the
    leader itself, that is all the time, so it read the group key back to back for the whole
    matchmaking time (about 1,300 DHT requests a round with two peers, measured by bench/scale.py)
    and took CPU from the all-reduce on small machines. A follower still looks at once when it
    starts, and the pauses between its next looks grow from ``FIRST_LOOKUP_INTERVAL`` to the interval:
    peers that became ready together (whose first looks found no one yet) find each other within
    tenths of a second, for a few more requests a round. The rest is hivemind's loop unchanged."""
    from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS as DISCREPANCY

    last, interval = -math.inf, FIRST_LOOKUP_INTERVAL
    while get_dht_time() < leaders.search_end_time:
        pause = last + interval - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        if last > -math.inf:
            interval = min(2 * interval, LEADER_LOOKUP_INTERVAL)
        last = time.monotonic()
        new_peers = await key_manager.get_averagers(key_manager.current_key, only_active=True)
        leaders.max_assured_time = max(leaders.max_assured_time, get_dht_time() + leaders.min_matchmaking_time - DISCREPANCY)
        leaders.leader_queue.clear()
        for peer, peer_expiration_time in new_peers:
            if peer == leaders.peer_id or (peer, peer_expiration_time) in leaders.past_attempts:
                continue
            leaders.leader_queue.store(peer, peer_expiration_time, peer_expiration_time)
            leaders.max_assured_time = max(leaders.max_assured_time, peer_expiration_time - DISCREPANCY)
        leaders.update_finished.set()
        waits = {asyncio.create_task(leaders.running.wait()), asyncio.create_task(leaders.update_triggered.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.ALL_COMPLETED,
                               timeout=leaders.search_end_time - get_dht_time() if math.isfinite(leaders.search_end_time) else None)
        finally:
            for task in waits:
                task.cancel()  # hivemind leaves these waiting when its search ends
        leaders.update_triggered.clear()


_undeclaring: set[asyncio.Task] = set()  # withdrawals of a declaration still under way (``_background_withdrawals``)


def _background_withdrawals(key_manager) -> None:
    """Make ``key_manager.declare_averager(..., looking_for_group=False)`` go on in the background.

    hivemind 1.1.12 withdraws a peer's declaration (its only call with ``looking_for_group=False``, at the
    end of ``PotentialLeaders._declare_averager_periodically``) and awaits that DHT store before the group
    it has just formed can begin: 0.06 to 0.12 s of every all-reduce with 8 peers on two cores
    (``bench/allreduce.py``). A peer that reads the old declaration meanwhile asks and is told that this
    one is no longer looking, as before. The withdrawal keeps the declaration's own expiration, so it
    can never hide a newer declaration of this peer."""
    declare = key_manager.declare_averager

    async def declare_or_withdraw(group_key, peer_id, expiration_time, looking_for_group: bool = True):
        if looking_for_group:
            return await declare(group_key, peer_id, expiration_time)
        task = asyncio.create_task(_withdraw(declare, group_key, peer_id, expiration_time))
        _undeclaring.add(task)
        task.add_done_callback(_undeclaring.discard)
        return True

    key_manager.declare_averager = declare_or_withdraw


async def _withdraw(declare, key, peer: PeerID, expiration: float) -> None:
    try:
        await declare(key, peer, expiration, looking_for_group=False)
    except Exception as e:  # noqa: BLE001 - the declaration then runs out at its expiration instead
        logger.debug(f"could not withdraw a declaration ({type(e).__name__})")


@functools.lru_cache(maxsize=64)
def _load_balance(vector_size: int, bandwidths: tuple, min_size: int = 0) -> tuple[int, ...]:
    """hivemind's ``load_balance_peers``, worked out once per (size, bandwidths): a linear program (scipy's
    interior point, 3 to 50 ms of an averager's time with 8 peers on two cores) that every all-reduce
    of a round's group asks again with the same numbers (``_even_split`` sets every bandwidth to 1)."""
    return tuple(load_balance_peers(vector_size, list(bandwidths), min_size))


def _cached_load_balance(vector_size, bandwidths, min_size: int = 0) -> tuple[int, ...]:
    return _load_balance(int(vector_size), tuple(None if b is None else float(b) for b in bandwidths), int(min_size))


hivemind_averager.load_balance_peers = _cached_load_balance  # what hivemind's ``_aggregate_with_group`` calls


def make_averager(
    dht: DHT, swarm_name: str, tensors: list[torch.Tensor], store_root: Path, compression: str,
    matchmaking_time: float, allreduce_timeout: float, min_group_size: int, chunk_timeout: float = 10.0,
    admission: dict | None = None, label: str = "", client_mode: bool = False, lane: bool = True, lane_port: int = 0,
) -> FusionAverager:
    """Start the averager process on the main thread (hivemind needs fork and installs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the averager must be created on the main thread")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        return FusionAverager(
            tensors,
            dht,
            prefix=averager_prefix(swarm_name),
            store_root=str(store_root),
            admission=admission,
            label=label,
            start=True,
            target_group_size=None,
            min_group_size=min_group_size,
            min_matchmaking_time=matchmaking_time,
            request_timeout=min(3.0, matchmaking_time / 2),
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=chunk_timeout,  # a member silent this long is dropped (2x for a reducer)
            compression=wire_compression(compression),
            part_size_bytes=PART_SIZE_BYTES,
            client_mode=client_mode,  # a peer others cannot dial: it sends its parts and reduces none
            lane=lane,
            lane_port=lane_port,
            allow_state_sharing=False,
            shutdown_timeout=5,
        )
    finally:
        signal.signal(signal.SIGINT, sigint)  # hivemind sets SIGINT to ignored in the parent: give Ctrl+C back


def wire_compression(name: str):
    """The manifest's ``fusion.compression`` as hivemind's codec. 8-bit needs numpy < 2.4 (pyproject.toml):
    newer numpy makes hivemind 1.1.12's 8-bit all-reduce return the inputs unchanged, silently."""
    if name == "float16":
        return Float16Compression()
    if name == "8bit":
        return Uniform8BitQuantization()
    return NoCompression()


def part_values(name: str) -> int:
    """Values per part of the all-reduce with the manifest's wire ``name`` in a group of the usual parts:
    hivemind splits every tensor into parts of ``PART_SIZE_BYTES`` after compression. A per-part strategy
    (whose central computation needs the same parts) and 8-bit compression always use them; others may
    use wider parts (``group_part_bytes``), which change no value."""
    codec = wire_compression(name)
    info = CompressionInfo.from_tensor(torch.zeros(1))
    return int(PART_SIZE_BYTES / (4 * codec.estimate_compression_ratio(info)))


def averager_prefix(swarm_name: str) -> str:
    return "cfp2p_" + swarm_name.replace(".", "_")
