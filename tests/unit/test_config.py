import os
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import msgspec
import pytest

from silo import __version__
from silo.cli import main
from silo.config import OPTIONS, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # main() reads os.environ; make sure the developer's shell cannot leak into the tests.
    for name in list(os.environ):
        if name.startswith("SILO_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "silo.toml"
    path.write_text(text)
    return str(path)


def load(argv=None, env=None, config_file=None) -> Config:
    return load_config(argv or {}, env or {}, config_file)


def assert_error(excinfo, option_name: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    opt = next(o for o in OPTIONS if o.name == option_name)
    assert opt.label in msg
    return msg


# --- defaults and the option table ---------------------------------------------------------


def test_defaults():
    cfg = load()
    assert cfg == Config()
    assert cfg.grpc_addr == "127.0.0.1:7450"
    assert cfg.advertised_addr == ""
    assert cfg.dev_mode is False
    assert cfg.auth_token == ""
    assert cfg.max_message_bytes == 134217728
    assert cfg.data_dir == "./silo-data"
    assert cfg.object_store_url == ""
    assert cfg.flush_interval_ms == 10
    assert cfg.commit_interval_ms == 0.0
    assert cfg.l0_sst_size_bytes == 8388608
    assert cfg.shards == 0  # one per worker process
    assert cfg.tenancy is False
    assert cfg.lease_ms == 10000
    assert cfg.reaper_interval_ms == 1000
    assert cfg.log_level == "info"
    assert cfg.log_format == "text"


def test_options_match_config_fields():
    assert tuple(o.name for o in OPTIONS) == Config.__struct_fields__
    assert len({o.env for o in OPTIONS}) == len({o.flag for o in OPTIONS}) == len(OPTIONS)
    assert len({o.toml for o in OPTIONS}) == len(OPTIONS)
    by_name = {o.name: o for o in OPTIONS}
    assert by_name["shards"].env == "SILO_SHARDS"
    assert by_name["shards"].flag == "--shards"
    assert by_name["shards"].toml == "shards.count"
    assert by_name["log_level"].toml == "logging.level"


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().shards = 3  # type: ignore[misc]


# --- precedence ----------------------------------------------------------------------------


def test_file_env_flag_precedence(tmp_path):
    path = write_toml(
        tmp_path,
        '[shards]\ncount = 2\n[jobs]\nlease_ms = 2000\n[logging]\nlevel = "debug"\n'
        "[storage]\ncommit_interval_ms = 5\n",
    )
    env = {"SILO_SHARDS": "3", "SILO_LEASE_MS": "3000"}
    argv = {"shards": "4"}

    assert load(config_file=path).shards == 2
    cfg = load(env=env, config_file=path)
    assert (cfg.shards, cfg.lease_ms, cfg.log_level) == (3, 3000, "debug")
    cfg = load(argv=argv, env=env, config_file=path)
    assert (cfg.shards, cfg.lease_ms, cfg.log_level) == (4, 3000, "debug")
    assert cfg.commit_interval_ms == 5.0 and isinstance(cfg.commit_interval_ms, float)
    # Untouched options keep their defaults.
    assert cfg.flush_interval_ms == 10


def test_none_override_and_empty_env_are_ignored(tmp_path):
    path = write_toml(tmp_path, '[server]\nauth_token = "s3cret"\n[shards]\ncount = 5\n')
    cfg = load(
        argv={"shards": None}, env={"SILO_SHARDS": "", "SILO_AUTH_TOKEN": ""}, config_file=path
    )
    assert cfg.shards == 5
    assert cfg.auth_token == "s3cret"


def test_typed_argv_values_accepted():
    cfg = load(argv={"shards": 5, "dev_mode": True, "commit_interval_ms": 0})
    assert (cfg.shards, cfg.dev_mode, cfg.commit_interval_ms) == (5, True, 0.0)


def test_unknown_override_name_rejected():
    with pytest.raises(ConfigError, match="unknown option 'shard'"):
        load(argv={"shard": 3})


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("grpc_addr", "localhost"),
        ("grpc_addr", "127.0.0.1:65536"),
        ("grpc_addr", "127.0.0.1:-1"),
        ("grpc_addr", ":7450"),
        ("grpc_addr", "::1:7450"),
        ("grpc_addr", "[nonsense]:7450"),
        ("grpc_addr", ""),
        ("advertised_addr", "host:port"),
        ("dev_mode", "maybe"),
        ("auth_token", "has space"),
        ("max_message_bytes", str(4 * 1024 * 1024 - 1)),
        ("data_dir", ""),
        ("object_store_url", "not a url"),
        ("object_store_url", "file://relative/path"),
        ("flush_interval_ms", "0"),
        ("flush_interval_ms", "60001"),
        ("commit_interval_ms", "-0.5"),
        ("commit_interval_ms", "1000.1"),
        ("commit_interval_ms", "nan"),
        ("l0_sst_size_bytes", "1048575"),
        ("shards", "-1"),
        ("shards", "4097"),
        ("shards", "abc"),
        ("shards", "2.5"),
        ("tenancy", "2"),
        ("lease_ms", "999"),
        ("lease_ms", "3600001"),
        ("reaper_interval_ms", "9"),
        ("reaper_interval_ms", "60001"),
        ("log_level", "verbose"),
        ("log_format", "xml"),
    ],
)
def test_validation_errors_name_the_option(name, bad):
    opt = next(o for o in OPTIONS if o.name == name)
    sources = [{"argv": {name: bad}}]
    if bad:  # an empty environment variable counts as unset
        sources.append({"env": {opt.env: bad}})
    for source in sources:
        with pytest.raises(ConfigError) as excinfo:
            load(**source)
        msg = assert_error(excinfo, name)
        assert msg.startswith(f"invalid value for {opt.label}: ")


def test_error_message_format():
    with pytest.raises(ConfigError) as excinfo:
        load(env={"SILO_SHARDS": "abc"})
    assert str(excinfo.value) == (
        "invalid value for shards (SILO_SHARDS / --shards / shards.count): "
        "must be an integer between 0 and 4096, got 'abc'"
    )


def test_secret_not_echoed():
    with pytest.raises(ConfigError) as excinfo:
        load(env={"SILO_AUTH_TOKEN": "top secret"})
    assert "top secret" not in str(excinfo.value)
    assert "<redacted>" in str(excinfo.value)
    assert Config(auth_token="abc").redacted()["auth_token"] == "<redacted>"
    assert Config().redacted()["auth_token"] == ""


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1:7450",
        "0.0.0.0:0",
        "localhost:65535",
        "[::1]:7450",
        "[::]:0",
        "silo-0.internal:7450",
    ],
)
def test_valid_addresses(addr):
    cfg = load(env={"SILO_GRPC_ADDR": addr, "SILO_ADVERTISED_ADDR": addr})
    assert cfg.grpc_addr == addr and cfg.advertised_addr == addr


def test_bounds_are_inclusive():
    cfg = load(
        argv={
            "shards": "4096",
            "flush_interval_ms": "1",
            "commit_interval_ms": "1000",
            "lease_ms": "1000",
            "reaper_interval_ms": "60000",
            "l0_sst_size_bytes": str(1024 * 1024),
            "max_message_bytes": str(4 * 1024 * 1024),
        }
    )
    assert cfg.shards == 4096 and cfg.commit_interval_ms == 1000.0


def test_toml_type_mismatch_rejected(tmp_path):
    for text, name in [
        ("[shards]\ncount = 8.0\n", "shards"),
        ('[shards]\ncount = "8"\n', None),  # strings are parsed like env values
        ("[server]\ndev_mode = 1\n", "dev_mode"),
        ("[server]\ngrpc_addr = 7450\n", "grpc_addr"),
        ("[storage]\nflush_interval_ms = true\n", "flush_interval_ms"),
    ]:
        path = write_toml(tmp_path, text)
        if name is None:
            assert load(config_file=path).shards == 8
            continue
        with pytest.raises(ConfigError) as excinfo:
            load(config_file=path)
        assert_error(excinfo, name)


# --- TOML file handling --------------------------------------------------------------------


def test_unknown_toml_key_rejected(tmp_path):
    path = write_toml(tmp_path, "[storage]\nflush_interval = 5\n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    msg = str(excinfo.value)
    assert "unknown key storage.flush_interval" in msg
    assert path in msg
    assert "did you mean storage.flush_interval_ms?" in msg


def test_unknown_toml_section_rejected(tmp_path):
    path = write_toml(tmp_path, "[sever]\ngrpc_addr = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[sever\].*did you mean server"):
        load(config_file=path)


def test_top_level_key_rejected(tmp_path):
    path = write_toml(tmp_path, "grpc_addr = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match="unknown key grpc_addr.*did you mean server.grpc_addr"):
        load(config_file=path)
    path = write_toml(tmp_path, "shards = 8\n")
    with pytest.raises(ConfigError, match=r"shards .* must be a table"):
        load(config_file=path)


def test_nested_table_rejected(tmp_path):
    path = write_toml(tmp_path, "[server.tls]\ncert = 'x'\n")
    with pytest.raises(ConfigError, match="unknown key server.tls"):
        load(config_file=path)


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    msg = str(excinfo.value)
    assert msg.startswith("cannot read config file") and path in msg and "\n" not in msg


def test_unparsable_config_file(tmp_path):
    path = write_toml(tmp_path, "[server\ngrpc_addr = \n")
    with pytest.raises(ConfigError) as excinfo:
        load(config_file=path)
    msg = str(excinfo.value)
    assert msg.startswith("cannot parse config file") and path in msg and "\n" not in msg


def test_empty_config_file_gives_defaults(tmp_path):
    assert load(config_file=write_toml(tmp_path, "")) == Config()


# --- booleans ------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_bool_true_words(word):
    cfg = load(env={"SILO_DEV_MODE": word, "SILO_TENANCY": word})
    assert cfg.dev_mode is True and cfg.tenancy is True


@pytest.mark.parametrize("word", ["0", "false", "False", "NO", "off"])
def test_bool_false_words(word, tmp_path):
    path = write_toml(tmp_path, "[server]\ndev_mode = true\n[tenancy]\nenabled = true\n")
    cfg = load(env={"SILO_DEV_MODE": word, "SILO_TENANCY": word}, config_file=path)
    assert cfg.dev_mode is False and cfg.tenancy is False


def test_choices_case_insensitive():
    cfg = load(env={"SILO_LOG_LEVEL": "DEBUG", "SILO_LOG_FORMAT": "Json"})
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")


# --- object store URL ----------------------------------------------------------------------


def test_object_store_url_resolved_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Config().object_store_url_resolved() == f"file://{tmp_path}/silo-data/objects"
    cfg = load(env={"SILO_DATA_DIR": "/var/lib/silo"})
    assert cfg.object_store_url_resolved() == "file:///var/lib/silo/objects"


def test_object_store_url_explicit():
    for url in ["memory:///", "s3://bucket/prefix", "file:///abs/path"]:
        cfg = load(env={"SILO_OBJECT_STORE_URL": url})
        assert cfg.object_store_url == url
        assert cfg.object_store_url_resolved() == url


def test_data_dir_expands_user(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert load(argv={"data_dir": "~/silo"}).data_dir == "/home/someone/silo"


# --- command line --------------------------------------------------------------------------


def test_cli_bad_flag_value_exits_2(capsys):
    assert main(["serve", "--shards", "-1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("silo: invalid value for shards (SILO_SHARDS / --shards")


def test_cli_bad_env_value_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("SILO_LOG_FORMAT", "xml")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log_format" in err


def test_cli_missing_config_file_exits_2(capsys, tmp_path):
    assert main(["serve", "-c", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("silo: cannot read config file") and err.count("\n") == 1


@pytest.fixture
def fake_server(monkeypatch):
    """Replace silo.runtime.server.run_server with a recorder; starts nothing."""
    calls: list[Config] = []

    def run_server(config: Config) -> int:
        calls.append(config)
        return 0

    stub = types.ModuleType("silo.runtime.server")
    monkeypatch.setitem(sys.modules, "silo.runtime.server", stub)
    monkeypatch.setattr(stub, "run_server", run_server, raising=False)
    return calls


def test_cli_success_calls_run_server(fake_server, monkeypatch, tmp_path):
    path = write_toml(tmp_path, "[shards]\ncount = 2\n[jobs]\nlease_ms = 5000\n")
    monkeypatch.setenv("SILO_SHARDS", "3")
    monkeypatch.setenv("SILO_DEV_MODE", "yes")
    rc = main(
        [
            "serve",
            "-c",
            path,
            "--shards",
            "4",
            "--no-dev-mode",
            "--tenancy",
            "--commit-interval-ms",
            "0.5",
            "--grpc-addr",
            "[::1]:0",
        ]
    )
    assert rc == 0
    [cfg] = fake_server
    assert cfg.shards == 4
    assert cfg.lease_ms == 5000
    assert cfg.dev_mode is False
    assert cfg.tenancy is True
    assert cfg.commit_interval_ms == 0.5
    assert cfg.grpc_addr == "[::1]:0"


def test_cli_returns_run_server_exit_code(monkeypatch):
    stub = types.ModuleType("silo.runtime.server")
    monkeypatch.setitem(sys.modules, "silo.runtime.server", stub)
    monkeypatch.setattr(stub, "run_server", lambda config: 7, raising=False)
    assert main(["serve"]) == 7


def test_cli_has_a_flag_per_option(capsys):
    assert main(["serve", "--help"]) == 0
    help_text = capsys.readouterr().out
    for opt in OPTIONS:
        assert opt.flag in help_text
        assert opt.env in help_text
        if opt.is_bool:
            assert "--no-" + opt.flag[2:] in help_text


def test_cli_unknown_or_abbreviated_flag_exits_2(capsys):
    assert main(["serve", "--shard", "3"]) == 2
    assert main(["serve", "--bogus"]) == 2


def test_cli_no_command_exits_2(capsys):
    assert main([]) == 2


def test_cli_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_python_dash_m_silo_version():
    proc = subprocess.run(
        [sys.executable, "-m", "silo", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"silo {__version__}"


# --- documentation -------------------------------------------------------------------------


def _doc() -> str:
    return (REPO / "CONFIGURATION.md").read_text()


def test_every_option_documented():
    rows = [line for line in _doc().splitlines() if line.startswith("| `")]
    for opt in OPTIONS:
        matching = [row for row in rows if row.startswith(f"| `{opt.toml}` |")]
        assert len(matching) == 1, f"{opt.toml} missing from the CONFIGURATION.md table"
        row = matching[0]
        assert f"`{opt.env}`" in row, opt.name
        assert f"`{opt.flag}`" in row, opt.name
        if opt.is_bool:
            assert f"`--no-{opt.flag[2:]}`" in row, opt.name
        assert f"`{opt.default_toml()}`" in row, f"default of {opt.name} is out of date"
    assert len(rows) == len(OPTIONS), "CONFIGURATION.md documents options that do not exist"


def test_documented_example_toml_loads(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", _doc(), re.DOTALL)
    assert len(blocks) == 1
    cfg = load(config_file=write_toml(tmp_path, blocks[0]))
    # The example sets every option.
    assert set(tomllib_keys(blocks[0])) == {o.toml for o in OPTIONS}
    assert cfg.log_format == "json"


def tomllib_keys(text: str) -> list[str]:
    doc = tomllib.loads(text)
    return [f"{section}.{key}" for section, table in doc.items() for key in table]


def test_config_roundtrips_through_msgspec():
    cfg = load(env={"SILO_SHARDS": "12"})
    assert msgspec.json.decode(msgspec.json.encode(cfg), type=Config) == cfg


def test_flush_interval_must_be_below_the_write_bound_without_flush_on_commit():
    """Without flush_on_commit every commit waits for the WAL tick: a tick slower than the
    write bound would fail every write, the shard's open included, so refuse it up front."""
    args = {"flush_on_commit": False, "flush_interval_ms": 20_000, "write_timeout_ms": 10_000}
    with pytest.raises(ConfigError, match=r"storage\.flush_interval_ms.*storage\.write_timeout_ms"):
        load_config(args, {}, None)
    load_config({**args, "write_timeout_ms": 30_000}, {}, None)
    load_config({**args, "flush_on_commit": True}, {}, None)  # the commit flushes itself
