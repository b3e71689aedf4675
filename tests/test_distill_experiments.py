import json
import os

from distill.experiments import _claim, table


def _result(d, top1, bal):
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"val_top1": top1, "val_balanced_acc": bal, "params": 1_490_000}))


def test_table_reports_mean_and_sample_std_over_seeds(tmp_path):
    _result(tmp_path / "teacher", 0.9, 0.88)
    _result(tmp_path / "mdkd-s0", 0.80, 0.70)
    _result(tmp_path / "mdkd-s1", 0.82, 0.72)
    _result(tmp_path / "mdkd-no-cls-s0", 0.5, 0.5)
    md = table(tmp_path).splitlines()
    rows = {ln.split("|")[1].strip(): ln for ln in md[2:]}
    assert list(rows) == ["teacher", "mdkd", "mdkd-no-cls"]
    assert "| 81.00 ± 1.41 | 71.00 ± 1.41 | 2 |" in rows["mdkd"]
    assert "| 90.00 | 88.00 | 1 |" in rows["teacher"]


def test_claim_is_exclusive_to_a_live_process(tmp_path):
    run = tmp_path / "kd-s0"
    assert _claim(run)
    assert _claim(run)  # same process: still ours
    (run / "worker.pid").write_text(str(os.getppid()))  # a live other process holds it
    assert not _claim(run)
    (run / "worker.pid").write_text("999999999")  # a dead one: taken over
    assert _claim(run)
