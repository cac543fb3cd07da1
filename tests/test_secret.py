import pytest

from p2pkv.errors import ConfigError
from p2pkv.secret import derive, load_secret


def test_load_and_derive(tmp_path):
    f = tmp_path / "s"
    f.write_text("  correct horse battery staple\n")
    s = load_secret(f)
    assert s == b"correct horse battery staple"
    assert derive(s, "a") != derive(s, "b") and len(derive(s, "a")) == 32


def test_short_or_missing_secret_is_refused(tmp_path):
    f = tmp_path / "s"
    f.write_text("short")
    with pytest.raises(ConfigError, match="shorter"):
        load_secret(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path / "nope")
