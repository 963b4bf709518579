"""Where the cache lives: --cache-dir, then DHAT_SEG_CACHE, then the XDG base-directory rule."""

from pathlib import Path

from dhat_seg.attention.model import cache_root


def test_override_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("DHAT_SEG_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "cli") == tmp_path / "cli"


def test_dhat_seg_cache_before_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("DHAT_SEG_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "env"


def test_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DHAT_SEG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dhat-seg"


def test_unset_empty_or_relative_xdg_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DHAT_SEG_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in (None, "", "relative/cache"):
        if value is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_root() == Path(tmp_path) / ".cache" / "dhat-seg"
