import pytest

from p2pkv.errors import ConfigError
from p2pkv.secret import derive, load_secret


def test_load_and_derive(tmp_path):
    f = tmp_path / "s"
    f.write_text("  correct horse battery staple\n")
    f.chmod(0o600)
    s = load_secret(f)
    assert s == b"correct horse battery staple"
    assert derive(s, "a") != derive(s, "b") and len(derive(s, "a")) == 32


def test_short_or_missing_secret_is_refused(tmp_path):
    f = tmp_path / "s"
    f.write_text("short")
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="shorter"):
        load_secret(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path / "nope")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o444])
def test_a_secret_others_can_read_is_refused(tmp_path, mode):
    f = tmp_path / "s"
    f.write_text("correct horse battery staple")
    f.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(f)
    f.chmod(0o400)
    link = tmp_path / "link"  # as a Kubernetes secret volume mounts it
    link.symlink_to(f)
    assert load_secret(link) == b"correct horse battery staple"
