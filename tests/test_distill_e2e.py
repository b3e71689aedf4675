"""End to end on a handful of real PBC images: train a teacher, distil a student with MDKD,
export it, and check the checkpoint contract (docs/contracts.md section 2)."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from distill.cli import main
from distill.errors import DistillError
from distill.export import load_model_file, read_metadata
from wsi_contracts.checkpoint import file_sha256 as sha256_file

CLASSES = ["erythroblast", "ig", "neutrophil"]


@pytest.fixture(scope="module")
def tiny_pbc(tmp_path_factory, shared_data):
    src = shared_data / "pbc"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    heldout = {ln.strip() for ln in open("configs/pbc_heldout.txt") if ln.strip() and not ln.startswith("#")}
    root = tmp_path_factory.mktemp("pbc_tiny")
    for c in CLASSES:
        (root / c).mkdir()
        files = [f for f in sorted((src / c).iterdir()) if f"{c}/{f.name}" not in heldout][:8]
        for f in files:
            shutil.copy(f, root / c / f.name)
    return root


def _cfg(tmp_path, root):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "preset: tiny\nimg_size: 32\npatch_size: 16\nteacher_depth: 4\nepochs: 1\nbatch_size: 8\n"
        "val_frac: 0.25\ncache_dir: null\nthreads: 2\nbf16: auto\ntile_mpp: 0.27\n"
        f"data: {root}\nsuspicious_classes: [erythroblast, ig]\n"
        "mdkd:\n  block_map: [[1, 2], [2, 3], [3, 4]]\n"
    )
    return cfg


def test_train_distill_export_roundtrip(tmp_path, tiny_pbc):
    runner = CliRunner()
    cfg = _cfg(tmp_path, tiny_pbc)
    r = runner.invoke(main, ["train-teacher", "--config", str(cfg), "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines[0]["epoch"] == 1 and 0 <= lines[0]["val_top1"] <= 1
    teacher = tmp_path / "t" / "model.safetensors"

    r = runner.invoke(main, ["distill", "--config", str(cfg), "--mode", "mdkd", "--teacher", str(teacher),
                             "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert {"train_spatial", "train_channel", "train_cls", "train_response"} <= set(json.loads(r.stdout.splitlines()[0]))

    out = tmp_path / "student.safetensors"
    r = runner.invoke(main, ["export", str(tmp_path / "s"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sha256"] == sha256_file(out)

    meta = read_metadata(out)
    assert meta["format"] == "wsi-triage-student" and meta["format_version"] == 1
    assert meta["class_names"] == CLASSES
    assert meta["suspicious_classes"] == ["erythroblast", "ig"]
    assert meta["input_size"] == 32 and meta["tile_size"] == 128 and meta["tile_mpp"] == 0.27
    arch = meta["architecture"]
    assert arch["family"] == "timm-vit" and arch["depth"] == 3 and arch["num_classes"] == 3
    prov = meta["provenance"]
    assert prov["teacher_sha256"] == sha256_file(teacher)
    assert prov["data_fingerprint"] and "val_top1" in prov["metrics"] and prov["config"]["mode"] == "mdkd"
    with safe_open(str(out), framework="pt") as f:  # fp16 weights by default, no projector tensors
        keys = list(f.keys())
        assert f.get_tensor("head.weight").dtype == torch.float16
    assert not any("projector" in k for k in keys)
    model, _ = load_model_file(out)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert "stain" not in meta

    # the stain preset the pipeline tiles with is written on request and kept by a re-export
    stained = tmp_path / "stained.safetensors"
    assert runner.invoke(main, ["export", str(out), "--out", str(stained), "--stain", "romanowsky"]).exit_code == 0
    again = tmp_path / "again.safetensors"
    assert runner.invoke(main, ["export", str(stained), "--out", str(again)]).exit_code == 0
    assert read_metadata(stained)["stain"] == read_metadata(again)["stain"] == "romanowsky"

    # the same model reports identically through evaluate
    r = runner.invoke(main, ["evaluate", str(teacher), str(out), "--config", str(cfg), "--out",
                             str(tmp_path / "rep"), "--bench-batches", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "student.json").read_text())
    assert rep["n_images"] == 6 and len(rep["confusion_matrix"]["rows_true_cols_pred"]) == 3
    assert (tmp_path / "rep" / "student_confusion.png").stat().st_size > 0
    assert rep["gflops"] > 0 and rep["throughput"]["fp32"] > 0

    # a killed-and-restarted run resumes from its saved state instead of starting over
    r = runner.invoke(main, ["distill", "--config", str(cfg), "--mode", "mdkd", "--teacher", str(teacher),
                             "--out", str(tmp_path / "s")])
    assert r.exit_code == 0 and "resumed from epoch 1" in r.output
    # ... but never silently continues a run with another config
    r = runner.invoke(main, ["distill", "--config", str(cfg), "--mode", "kd", "--teacher", str(teacher),
                             "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "different config" in r.output


def test_pickles_and_bad_metadata_are_refused(tmp_path):
    pk = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, pk)
    with pytest.raises(DistillError, match="pickles are never opened"):
        load_model_file(pk)
    from safetensors.torch import save_file

    bad = tmp_path / "nometa.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"format": "wsi-triage-student"})
    with pytest.raises(DistillError, match="'format_version' is missing"):
        read_metadata(bad)


def test_cli_user_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["train-teacher", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error:") and "not found" in r.output
    r = CliRunner().invoke(main, ["distill", "--set", "bogus=1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown config keys ['bogus']" in r.output
