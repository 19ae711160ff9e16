"""storage.local_fsync: TOML key, environment variable and flag, default on; a bad value is
one line naming the option and `silo serve` exits 2 (the worker applying it:
tests/integration/test_local_fsync.py)."""

from __future__ import annotations

import os
import sys
import types

import pytest

from silo.cli import main
from silo.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SILO_"):
            monkeypatch.delenv(name)


def test_default_is_on():
    assert load_config({}, {}, None).local_fsync is True


def test_toml_env_and_flag(tmp_path):
    f = tmp_path / "silo.toml"
    f.write_text("[storage]\nlocal_fsync = false\n")
    assert load_config({}, {}, str(f)).local_fsync is False
    assert load_config({}, {"SILO_LOCAL_FSYNC": "off"}, None).local_fsync is False
    assert load_config({}, {"SILO_LOCAL_FSYNC": "1"}, str(f)).local_fsync is True  # env > file
    assert load_config({"local_fsync": True}, {"SILO_LOCAL_FSYNC": "0"}, None).local_fsync


def _serve(monkeypatch, argv: list[str]):
    seen = {}
    stub = types.ModuleType("silo.runtime.server")
    monkeypatch.setitem(sys.modules, "silo.runtime.server", stub)
    monkeypatch.setattr(stub, "run_server", lambda config: seen.setdefault("c", config) and 0,
                        raising=False)
    assert main(["serve", *argv]) == 0
    return seen["c"]


def test_cli_flags(monkeypatch):
    assert _serve(monkeypatch, ["--no-local-fsync"]).local_fsync is False
    monkeypatch.setenv("SILO_LOCAL_FSYNC", "false")
    assert _serve(monkeypatch, ["--local-fsync"]).local_fsync is True


def test_bad_value_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError) as e:
        load_config({}, {"SILO_LOCAL_FSYNC": "sometimes"}, None)
    assert "\n" not in str(e.value)
    assert "local_fsync (SILO_LOCAL_FSYNC / --local-fsync / storage.local_fsync)" in str(e.value)
    f = tmp_path / "silo.toml"
    f.write_text("[storage]\nlocal_fsync = 3\n")
    assert main(["serve", "-c", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "storage.local_fsync" in err
    monkeypatch.setenv("SILO_LOCAL_FSYNC", "maybe")
    assert main(["serve"]) == 2
    assert "SILO_LOCAL_FSYNC" in capsys.readouterr().err
