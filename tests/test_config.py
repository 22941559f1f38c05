"""Configuration: what the README documents is what the server reads, and bad values stop it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fieldsync.config import SETTINGS, ConfigError, Settings

README = Path(__file__).parent.parent / "README.md"


def test_the_readme_documents_every_setting_and_nothing_else() -> None:
    documented = set(re.findall(r"`(FIELDSYNC_[A-Z_]+)`", README.read_text()))
    documented.discard("FIELDSYNC_REQUIRE_SERVICES")  # the test suite's, not the server's
    documented.discard("FIELDSYNC_DEMO_LDAP_PASSWORD")  # the demo's, not the server's
    assert documented == {s.env for s in SETTINGS}


def test_the_readme_starts_with_the_two_commands() -> None:
    block = README.read_text().split("```")[1]
    assert "make run" in block
    assert "make test" in block


def test_environment_overrides_file_overrides_default(tmp_path: Path) -> None:
    config = tmp_path / "fieldsync.toml"
    config.write_text('port = 9000\nroles_claim = "realm_access.roles"\nrate = 100\n')
    settings = Settings.load(config, {"FIELDSYNC_PORT": "9100"})
    assert settings.port == 9100
    assert settings.roles_claim == "realm_access.roles"
    assert settings.rate == 100.0
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"FIELDSYNC_PORT": "eighty"}, "FIELDSYNC_PORT"),
        ({"FIELDSYNC_PORT": "70000"}, "FIELDSYNC_PORT"),
        ({"FIELDSYNC_OIDC_ISSUER": "idp.example.com"}, "FIELDSYNC_OIDC_ISSUER"),
        ({"FIELDSYNC_MIN_CLIENT_VERSIONS": "ios"}, "FIELDSYNC_MIN_CLIENT_VERSIONS"),
        ({"FIELDSYNC_MAX_FRAME": "-1"}, "FIELDSYNC_MAX_FRAME"),
        ({"FIELDSYNC_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_a_bad_value_names_the_setting(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.load(None, environ)
    assert named in str(error.value)


def test_an_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "fieldsync.toml"
    config.write_text("prot = 9000\n")
    with pytest.raises(ConfigError, match="prot"):
        Settings.load(config, {})


def test_serve_without_an_issuer_stops_with_a_message_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fieldsync", "serve"],
        env={"FIELDSYNC_DATA_DIR": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "FIELDSYNC_OIDC_ISSUER" in result.stderr
