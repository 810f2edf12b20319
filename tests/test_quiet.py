"""``--quiet`` means quiet: nothing on stderr from actpat or from the libraries it drives
(lm-evaluation-harness's bars, git's "not a git repository" from its commit lookup)."""

from __future__ import annotations

import json

from tinylm import save_tiny_lm

from actpat.cli import main


def test_eval_quiet_prints_nothing_on_stderr(tmp_path, capfd, monkeypatch):
    model = save_tiny_lm(tmp_path / "model", context=2048)
    data = tmp_path / "data"
    (data / "boolq").mkdir(parents=True)
    rows = [{"passage": f"The mill by river {i} was built of stone.", "question": f"is mill {i} "
             "made of stone", "answer": i % 2 == 0} for i in range(6)]
    (data / "boolq" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "test.txt").write_text("The river bends twice before the mill.\n" * 40)
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's git lookup would complain here
    capfd.readouterr()
    rc = main(["eval", "--model", model, "--tasks", "wikitext2,boolq", "--limit", "4",
               "--seq-len", "32", "--device", "cpu", "--quiet", "--data-dir", str(data)])
    out, err = capfd.readouterr()
    assert rc == 0
    assert err == ""
    assert "boolq" in out and "n 4 (validation)" in out and "wikitext2" in out
