"""bench/provenance.py: the commit every bench labels its figures with."""

import re

from bench import provenance


def test_the_named_commit_wins(monkeypatch):
    monkeypatch.setenv("INFINILM_NB_COMMIT", "abc1234")
    assert provenance.commit() == "abc1234"


def test_without_a_name_it_is_the_repository_s_described_head(monkeypatch):
    monkeypatch.delenv("INFINILM_NB_COMMIT", raising=False)
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?|.+-g[0-9a-f]{7,40}(-dirty)?", provenance.commit())


def test_without_git_it_says_unknown(monkeypatch):
    monkeypatch.delenv("INFINILM_NB_COMMIT", raising=False)
    monkeypatch.setenv("PATH", "")  # no git to run
    assert provenance.commit() == "unknown"
