"""The cfp2p command line (Typer + Rich)."""
