"""ColD Fusion (collaborative descent) as a peer-to-peer tool.

Rooms: ``config`` (swarm manifest), ``model`` (body/head, hashing), ``data`` (private data),
``training`` (local finetune), ``fusion`` (the round's arithmetic and checks), ``store``
(versioned bases on disk), ``swarm`` (everything that touches hivemind), ``contributor``
(the join loop that ties them together).
"""

__version__ = "0.1.0"
