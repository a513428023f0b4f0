"""Everything that touches hivemind, behind one door: the DHT node, the records, the verifying
averager and transfers. No other room imports hivemind, so the method stays testable without a
network and the engine stays replaceable.

- ``node``: starting a DHT node with this peer's identity; stopping hivemind processes.
- ``validation``: the validator every node runs on the protocol's records (``coldfusion_p2p.records``).
- ``board``: this peer's reads and writes of the swarm's records; the signed manifest.
- ``averager``: the canonical all-reduce whose reducers enforce the round's rules.
- ``transfer``: serving and fetching bases, certificates and model files.
- ``streams``: hivemind's p2pd streams, bounded against a peer that does not follow the protocol.
"""

import os

os.environ.setdefault("HIVEMIND_LOGLEVEL", "CRITICAL")  # we report hivemind's failures in our own one-liners

from coldfusion_p2p.swarm import streams  # noqa: E402

streams.harden()  # before any node starts: every process of a peer reads other peers' streams with bounds

from coldfusion_p2p.swarm.node import (  # noqa: E402
    Identity, dht_requests, dht_time, peer_of_maddr, peer_str, quiet_hivemind, start_dht, stop_process, visible_maddrs,
)
from coldfusion_p2p.swarm.board import (  # noqa: E402
    SwarmRecords, authority_of, metrics_record, open_manifest, sign_manifest,
)
from coldfusion_p2p.swarm.averager import FusionAverager, averager_prefix, make_averager  # noqa: E402
from coldfusion_p2p.swarm.transfer import BlobError, fetch_blob, sha256_file  # noqa: E402
from coldfusion_p2p.swarm.validation import ProtocolValidator  # noqa: E402

__all__ = [
    "Identity", "dht_requests", "dht_time", "peer_of_maddr", "peer_str", "quiet_hivemind", "start_dht", "stop_process",
    "visible_maddrs", "SwarmRecords", "authority_of", "metrics_record", "open_manifest", "sign_manifest", "FusionAverager",
    "averager_prefix", "make_averager", "BlobError", "fetch_blob", "sha256_file", "ProtocolValidator",
]
