"""ColD Fusion (collaborative descent) as a peer-to-peer tool.

Rooms: ``config`` (swarm manifest), ``model`` (body/head, hashing), ``data`` (private data),
``training`` (local finetune), ``fusion`` (the round's arithmetic and checks), ``store``
(versioned bases on disk), ``swarm`` (everything that touches hivemind), ``contributor``
(the join loop that ties them together).
"""

__version__ = "0.1.0"

# The command line and the bootstrap peer live in the repository's top-level cli/ and bootstrap/
# folders and install as coldfusion_p2p.cli and coldfusion_p2p.bootstrap (pyproject's package-dir).
# Imported straight from a source checkout (PYTHONPATH=., or a non-editable install run from the
# repository), this package is the checkout's folder, which has neither: look beside it as well.
def _checkout_root():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "cli" / "main.py").is_file() and (root / "bootstrap" / "peer.py").is_file():
        return str(root)
    return None


if (_root := _checkout_root()) is not None and _root not in __path__:
    __path__.append(_root)
del _checkout_root, _root
