"""The floor under this project's all-reduce on this machine: the CPU work its protocol does per value,
with no network at all, against gloo's whole all-reduce of the same vector in the same run.

In a P-peer all-reduce each peer sends its slices to the P-1 other reducers, reduces its own slice
of everyone's values, and takes back the averages. This bench does, in one thread, exactly the
per-part work one peer's processes do for that with the project's own functions (nothing sent;
``bench/allreduce.py`` measures the real thing):

- as a sender, per part for each remote reducer: the part's message as a lane frame carries it (its
  fields, and the tensor's bytes sent from its memory: ``lane.LanePart``); then the reducer's average
  back: the fields, the tensor made on the buffer its bytes were read into, its bound check
  (``part_problem``), and its copy into the model's tensor;
- as a reducer, per part of its own slice: each remote sender's frame, message and tensor, the
  round's rules (``part_violation``); the strategy's exact float64 reduction and, in groups of three
  or more, each member's distance from it, the outlier report (both ``reduce_measured``, as a reducer
  does: the mean adds the distances up in the same pass); the average's message for each remote sender.

``--protobuf`` encodes every message whole (``serialize_torch_tensor``, the ``AveragingData`` bytes and
back), as a p2pd stream carries it, and as lanes did before their frames carried raw tensors.

What it leaves out of that work is only a floor's friend: p2pd, asyncio, the DHT, matchmaking, lane
framing and encryption. The P peers' processes share this machine's cores, so the all-reduce's wall
time is at least ``P x work / cores`` (the "work floor" printed next to gloo's).

The bytes themselves are the other part of any floor: each peer sends, and receives, 2(P-1)/P of the
vector's bytes (its parts out and the averages back as a sender, the others' parts in and their
averages out as a reducer), exactly what each rank of gloo's ring all-reduce sends and receives. Over
loopback every byte is copied by the kernel twice, into the sender's socket and out to the reader.
``kernel`` is that CPU time for one peer's share: the same bytes in 512 KiB sends through a loopback
TCP connection between two threads, with no Python work per message (``socket.sendall`` and
``recv_into`` a reused buffer), both ends' CPU counted. ``P x kernel / cores`` is gloo's own floor; the
protocol's floor is ``P x (work + kernel) / cores``.

    python bench/allreduce_floor.py --peers 2 4 8 --values 22.7e6

Run it alone: it times CPU work, and gloo's ranks compete for the same cores.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def peer_work(peers: int, values: int, strategy_name: str = "mean", protobuf: bool = False) -> dict[str, float]:
    """Seconds of one peer's CPU work in a ``peers``-peer all-reduce of ``values`` float32 values, by step."""
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import averaging_pb2, runtime_pb2

    from coldfusion_p2p.strategies import strategy_for
    from coldfusion_p2p.swarm import lane
    from coldfusion_p2p.swarm.averager import part_problem, part_values, part_violation

    none = runtime_pb2.CompressionType.NONE
    strategy = strategy_for(strategy_name)
    rules = {"min_weight": 1.0, "max_weight": 1.0, "part_bound": 1e9}
    n = part_values("none")
    share = values // peers
    parts = [min(n, share - i) for i in range(0, share, n)]  # one reducer's slice, in parts
    g = torch.Generator().manual_seed(peers)
    mine = [torch.randn(k, generator=g) * 1e-3 for k in parts]  # this peer's values of one slice (reused for each)
    others = [[torch.randn(k, generator=g) * 1e-3 for k in parts] for _ in range(peers - 1)]
    out = torch.empty(share)
    spent = dict.fromkeys(("encode", "decode", "check", "reduce", "copy"), 0.0)

    def timed(step, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        spent[step] += time.perf_counter() - t
        return result

    def frame(tensor: torch.Tensor, **fields) -> tuple[bytes, memoryview | bytes]:
        """What a sender or a reducer writes: the message's fields and the raw bytes after them."""
        if protobuf:
            return averaging_pb2.AveragingData(tensor_part=serialize_torch_tensor(tensor, none), **fields).SerializeToString(), b""
        part = lane.raw_part(tensor, **fields)
        return part.meta.SerializeToString(), memoryview(part.wire.numpy()).cast("B")

    def received(sent: tuple[bytes, memoryview | bytes]) -> tuple[bytearray, bytearray]:
        """The buffers the other end's socket reads fill (the kernel's copy: not timed)."""
        return bytearray(sent[0]), bytearray(sent[1])

    def unframe(buffers: tuple[bytearray, bytearray]) -> torch.Tensor:
        """What the other end makes of the buffers it read."""
        meta = averaging_pb2.AveragingData.FromString(bytes(buffers[0]))
        return deserialize_torch_tensor(meta.tensor_part) if protobuf else lane.LanePart(meta, lane._raw_wire(meta, buffers[1])).tensor

    # as a sender: the P-1 remote reducers' slices out, their averages back
    for _ in range(peers - 1):
        offset = 0
        for part in mine:
            timed("encode", frame, part, weight=1.0)
            average = timed("decode", unframe, received(frame(part)))  # the reducer encoded it; decoding is ours
            timed("check", part_problem, average, 1e9)
            timed("copy", out[offset:offset + len(part)].copy_, average)
            offset += len(part)
    # as a reducer: every member's part of this peer's slice in, the average out to each
    for i, part in enumerate(mine):
        parts_in = []
        for other in others:
            buffers = received(frame(other[i], weight=1.0))  # the sender's encoding is the sender's work
            parts_in.append(timed("decode", unframe, buffers))
            timed("check", part_violation, 1.0, parts_in[-1], rules)
        members = [part] + parts_in  # its own part as the wire would carry it: uncompressed, itself
        if len(members) >= 3:  # with the distances from the result, for the outlier report (it needs three members)
            result, _ = timed("reduce", strategy.reduce_measured, members, [1.0] * len(members))
        else:
            result = timed("reduce", strategy.reduce, members, [1.0] * len(members))
        if protobuf:  # encoded once, a message for each sender
            encoded = timed("encode", serialize_torch_tensor, result, none)
            for _ in others:
                timed("encode", lambda: averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=encoded).SerializeToString())
        else:
            answer = timed("encode", lane.raw_part, result, code=averaging_pb2.AVERAGED_PART)
            for _ in others:
                timed("encode", lambda: (answer.meta.SerializeToString(), memoryview(answer.wire.numpy()).cast("B")))
    spent["total"] = sum(spent.values())
    return spent


def kernel_copy(nbytes: int, chunk: int = 1 << 19) -> float:
    """CPU seconds (both threads) that moving ``nbytes`` through a loopback TCP connection costs, in
    ``chunk``-byte sends read into a reused buffer: the kernel's two copies, and nothing per message
    beyond one ``sendall`` and the reads it takes."""
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        reader, _ = server.accept()
    data, buffer = bytes(chunk), bytearray(chunk)

    def send() -> None:
        left = nbytes
        while left > 0:
            sender.sendall(memoryview(data)[:min(chunk, left)])
            left -= chunk

    with sender, reader:
        thread = threading.Thread(target=send)
        start = time.process_time()
        thread.start()
        view, left = memoryview(buffer), nbytes
        while left > 0:
            got = reader.recv_into(view)
            if not got:
                raise ConnectionError("the loopback connection closed early")
            left -= got
        thread.join()
        return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--values", type=float, nargs="+", default=[22.7e6])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the peers share (this machine's by default)")
    ap.add_argument("--strategy", default="mean", help="the fusion strategy the reducers run (mean, trimmed_mean, filtered_mean, ...)")
    ap.add_argument("--protobuf", action="store_true", help="encode whole protobuf messages, as p2pd streams carry them")
    ap.add_argument("--no-gloo", action="store_true", help="skip gloo's all-reduce")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from allreduce import gloo

    print(f"{'peers':>5} {'values':>8} {'gloo s':>7} {'work/peer s':>12} {'kernel/peer s':>14} {'work floor s':>13} "
          f"{'kernel floor s':>15} {'floor s':>8} {'floor x gloo':>13}   work by step (s): encode decode check reduce copy",
          flush=True)
    for values in (int(v) for v in args.values):
        for peers in args.peers:
            runs = [peer_work(peers, values, args.strategy, args.protobuf) for _ in range(args.repeats)]
            work = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            moved = int(2 * (peers - 1) / peers * 4 * values)  # bytes each peer sends, and receives
            kernel = statistics.median(kernel_copy(moved) for _ in range(args.repeats))
            share = peers / min(peers, args.cores)  # the cores' time one peer's work takes when all P work at once
            g = math.nan if args.no_gloo else gloo(peers, values, args.repeats)
            floor = share * (work["total"] + kernel)
            steps = " ".join(f"{work[k]:.3f}" for k in ("encode", "decode", "check", "reduce", "copy"))
            print(f"{peers:>5} {values / 1e6:>7.1f}M {g:>7.3f} {work['total']:>12.3f} {kernel:>14.3f} {share * work['total']:>13.3f} "
                  f"{share * kernel:>15.3f} {floor:>8.3f} {floor / g:>13.1f}   {steps}", flush=True)


if __name__ == "__main__":
    main()
