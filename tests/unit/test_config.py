from datetime import timedelta
from pathlib import Path

import pytest

from trustmesh.config import ServerConfig, default_home, load_config_file, parse_duration
from trustmesh.errors import ConfigError


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("10m", 600), ("24h", 86400), ("7d", 604800), ("1h30m", 5400),
    ("250ms", 0.25), ("3600", 3600), (45, 45),
])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "10x", "1h30", "-5", "ten minutes"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_home_defaults_to_dot_trustmesh_and_follows_env() -> None:
    assert default_home({}) == Path("~/.trustmesh").expanduser()
    assert default_home({"TRUSTMESH_HOME": "/srv/tm"}) == Path("/srv/tm")


def test_yaml_and_toml_files_use_the_flag_names(tmp_path: Path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text("trust-domain: prod.example.com\nkey-manager:\n  kind: memory\n"
                 "crl-validity: 2h\n")
    t = tmp_path / "s.toml"
    t.write_text('[server]\ntrust_domain = "prod.example.com"\ncrl_validity = "2h"\n'
                 '[server.key_manager]\nkind = "memory"\n')
    for f in (y, t):
        cfg = ServerConfig.build(load_config_file(f), {})
        assert cfg.trust_domain == "prod.example.com"
        assert cfg.key_manager.kind == "memory"
        assert cfg.crl_validity == timedelta(hours=2)


def test_flags_override_the_file_and_none_flags_do_not(tmp_path: Path) -> None:
    cfg = ServerConfig.build({"trust_domain": "a.org", "http_address": "127.0.0.1:1"},
                             {"trust_domain": "b.org", "http_address": None})
    assert cfg.trust_domain == "b.org" and cfg.http_address == "127.0.0.1:1"
    assert cfg.datastore_url == f"sqlite:///{cfg.data_dir / 'datastore.sqlite3'}"


@pytest.mark.parametrize("values,match", [
    ({"trust_domain": "Example.org"}, "lower-case"),
    ({"http_address": "localhost"}, "HOST:PORT"),
    ({"ca_key_algorithm": "dsa-1024"}, "unknown key algorithm"),
    ({"colour": "blue"}, "unknown setting"),
    ({"key_manager": {"kind": "tpm"}}, "key_manager.kind"),
    ({"crl_validity": "soon"}, "invalid duration"),
])
def test_bad_settings_name_the_key(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerConfig.build(values, {})


def test_unreadable_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("trust_domain = [")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(lst)
