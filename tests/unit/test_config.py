"""Agent configuration: TOML, environment overrides, clear errors."""

from pathlib import Path

import pytest

from stoker.config import ConfigError, load_config

TOKEN = "t" * 32


def test_defaults():
    config = load_config(None, environ={})
    assert config.data_dir == Path("/var/lib/stoker")
    assert config.socket_path == Path("/var/lib/stoker/stoker.sock")
    assert config.api.tcp_port is None


def test_toml_then_environment(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        f'data_dir = "/srv/stoker"\n[api]\ntcp_port = 8080\ntoken = "{TOKEN}"\n'
        "[resources]\ninterval_s = 60\n"
    )
    config = load_config(
        path,
        environ={
            "STOKER_API__TCP_PORT": "9090",
            "STOKER_RESOURCES__INTERVAL_S": "1",
            "STOKER_GUEST_DIR": "/not/a/setting",
        },
    )
    assert config.data_dir == Path("/srv/stoker")
    assert config.api.tcp_port == 9090 and config.api.resolved_token() == TOKEN
    assert config.sections["resources"] == {"interval_s": "1"}


def test_tcp_needs_a_token():
    with pytest.raises(ConfigError, match="bearer token"):
        load_config(None, environ={"STOKER_API__TCP_PORT": "8080"})


def test_bad_toml_says_where(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("data_dir = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[api]\nsockett = '/x'\n")
    with pytest.raises(ConfigError, match=r"api\.sockett"):
        load_config(path, environ={})


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path("/nonexistent/agent.toml"), environ={})


def test_data_dir_must_leave_room_for_socket_paths():
    with pytest.raises(ConfigError, match="107-byte Unix socket limit"):
        load_config(None, environ={"STOKER_DATA_DIR": "/srv/" + "x" * 80})
    assert load_config(None, environ={"STOKER_DATA_DIR": "/srv/" + "x" * 60}).data_dir
