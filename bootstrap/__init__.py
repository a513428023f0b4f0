"""What a lab runs to start a private swarm: the long-lived bootstrap peer and the swarm manifest.

``swarm.toml`` beside this file is the documented example manifest.
"""

from pathlib import Path

EXAMPLE_CONFIG = Path(__file__).with_name("swarm.toml")
