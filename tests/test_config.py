import pytest

from coldfusion_p2p.bootstrap import EXAMPLE_CONFIG
from coldfusion_p2p.config import SwarmManifest
from coldfusion_p2p.errors import UserError


def test_example_config_loads_and_round_trips():
    m = SwarmManifest.from_toml(EXAMPLE_CONFIG)
    assert m.name == "coldfusion" and m.model.source == "all-MiniLM-L6-v2"
    assert m.fusion.strategy == "mean" and m.fusion.outer_lr is None and m.strategy().outer_lr == 1.0 and m.fusion.weighting == "uniform"
    again = SwarmManifest.from_dict(m.to_dict())
    assert again == m


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[swarm]\nname = 'has space'\n", "swarm name"),
        ("[training]\nlr = 'fast'\n", "wrong type"),
        ("[training]\nbogus = 1\n", "unknown setting"),
        ("[nonsense]\nx = 1\n", "unknown section"),
        ("[fusion]\nweighting = 'loudest'\n", "weighting"),
        ("[round]\nmin_group_size = 1\n", "min_group_size"),
        ("[round]\nmax_attempts = 101\n", "max_attempts must be between 1 and 100"),
        ("[round]\nmax_attempts = 0\n", "max_attempts must be between 1 and 100"),
        ("[training\n", "not valid TOML"),
    ],
)
def test_bad_configs_get_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        SwarmManifest.from_toml(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_config(tmp_path):
    with pytest.raises(UserError, match="not found"):
        SwarmManifest.from_toml(tmp_path / "nope.toml")


def test_integers_accepted_for_float_settings(tmp_path):
    path = tmp_path / "swarm.toml"
    path.write_text("[fusion]\nouter_lr = 1\n[round]\nround_window = 30\n")
    m = SwarmManifest.from_toml(path)
    assert m.fusion.outer_lr == 1.0 and isinstance(m.round.round_window, float)
