"""Training on a user's own cells: the README guide followed end to end, the starter config,
config problems reported before training, re-export without retraining, evaluate on a subset of
a checkpoint's classes, the group-aware split and the bf16 decision.

Real images throughout: the 336 PBC cells shipped in wsi_pipeline/data/cells (always present),
and ../shared/data/pbc where a test needs more (skipped with a reason when absent).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from distill.cli import main
from distill.config import load_config
from distill.data import group_keys, scan_imagefolder, stratified_split
from distill.export import load_model_file, read_metadata
from distill.runtime import cpu_native_bf16, resolve_runtime

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "wsi_pipeline" / "data" / "cells"
DEMO = ROOT / "wsi_pipeline" / "data" / "demo_student.safetensors"
# the guide's Pap class names, filled with real PBC cells (the slide test bed plants erythroblast / ig)
AS_GUIDE = {"NILM": "neutrophil", "HSIL": "erythroblast", "SCC": "ig"}
TINY = ["--epochs", "1", "--set", "img_size=32", "--set", "teacher_depth=4", "--set", "batch_size=8",
        "--set", "mdkd.block_map=[[1,2],[2,3],[3,4]]", "--set", "threads=2"]


def _cells(dst: Path, classes: dict[str, str], n: int = 12) -> Path:
    """``dst/<name>/`` holding the first ``n`` shipped images of PBC class ``classes[name]``."""
    for name, src in classes.items():
        (dst / name).mkdir(parents=True)
        for f in sorted((CELLS / src).iterdir())[:n]:
            shutil.copy(f, dst / name / f.name)
    return dst


def _guide_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train on your own cells", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip().startswith(("wsi-distill", "wsi-triage"))]


def _distill(args: list[str]):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (args, r.output)
    return r


@pytest.mark.slow
def test_readme_guide_end_to_end(tmp_path, monkeypatch):
    """Every command of the guide's code block, in order, from a folder of class subfolders to
    ``wsi-triage run --checkpoint`` on a synthetic smear. Changed only where a real user's values
    differ from ours: the shipped cells' pixel size (0.27) and stain (romanowsky), the slide (a
    smear synthesised from the shipped cells), and a tiny model for CPU time."""
    monkeypatch.chdir(tmp_path)
    _cells(tmp_path / "my_cells", AS_GUIDE)
    cmds = _guide_commands()
    assert [c.split()[:2] for c in cmds] == [["wsi-distill", "init"], ["wsi-distill", "train-teacher"],
                                              ["wsi-distill", "distill"], ["wsi-distill", "evaluate"],
                                              ["wsi-distill", "export"], ["wsi-triage", "run"]]
    slide = tmp_path / "smear.tiff"
    r = subprocess.run([sys.executable, "-m", "wsi_pipeline", "synth", str(slide), "--size", "2048x2048",
                        "--seed", "3", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for cmd in cmds:
        cmd = cmd.replace("--mpp 0.25", "--mpp 0.27").replace("--stain pap", "--stain romanowsky")
        args = shlex.split(cmd.replace("my_slide.svs", str(slide)))
        if args[0] == "wsi-triage":
            r = subprocess.run([sys.executable, "-m", "wsi_pipeline", *args[1:], "--quiet"], capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
            continue
        if args[1] in ("train-teacher", "distill"):
            args += TINY
        r = _distill(args[1:])
        if args[1] == "init":
            cfg = yaml.safe_load(Path("my_cells.yaml").read_text())
            assert cfg["data"] == "my_cells" and cfg["suspicious_classes"] == ["HSIL", "SCC"]
            assert cfg["tile_mpp"] == 0.27 and cfg["tile_size"] == 128 and cfg["img_size"] == 128
        if args[1] == "evaluate":
            reps = [json.loads(ln) for ln in r.stdout.splitlines()]
            assert len(reps) == 2 and all(0 <= x["top1"] <= 1 for x in reps)
    meta = read_metadata("my_cells.safetensors")
    assert meta["class_names"] == ["HSIL", "NILM", "SCC"] and meta["suspicious_classes"] == ["HSIL", "SCC"]
    assert meta["tile_mpp"] == 0.27 and meta["tile_size"] == 128 and meta["stain"] == "romanowsky"
    assert meta["provenance"]["teacher_sha256"]
    summary = json.loads((tmp_path / "triage-out" / "smear" / "summary.json").read_text())
    assert summary["class_names"] == ["HSIL", "NILM", "SCC"]
    assert summary["tiles"]["n_tiles"] > 0 and 0 <= summary["score"]["value"] <= 1
    # the pipeline tiled at the checkpoint's pixel size: 128 px at 0.27 um/px on a 0.25 um/px slide
    assert summary["top_tiles"][0]["w"] == round(128 * 0.27 / 0.25)


def test_init_writes_a_config_that_loads_and_refuses_unknown_classes(tmp_path):
    data = _cells(tmp_path / "cells", {"basophil": "basophil", "ig": "ig", "monocyte": "monocyte"}, n=6)
    out = tmp_path / "conf" / "mine.yaml"
    r = CliRunner().invoke(main, ["init", str(data), "--suspicious", "ig", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "tile_mpp: null" in text and "REQUIRED" in text and "group_pattern" in text
    cfg = load_config(out)
    assert Path(cfg.data).resolve() == data.resolve()  # written relative to the config's folder
    assert cfg.suspicious_classes == ["ig"] and cfg.tile_size == 128 and cfg.bf16 == "auto"
    # an unknown suspicious class is refused at once, nothing written
    bad = tmp_path / "bad.yaml"
    r = CliRunner().invoke(main, ["init", str(data), "--suspicious", "ig,blast", "--out", str(bad)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert "['blast']" in r.stderr and not bad.exists()
    # training refuses to start until tile_mpp is filled in
    r = CliRunner().invoke(main, ["train-teacher", "--config", str(out)])
    assert r.exit_code == 2 and "tile_mpp is not set" in r.stderr and str(out) in r.stderr


def _base_config(tmp_path: Path, data: Path, **over) -> Path:
    d = {"data": str(data), "suspicious_classes": ["HSIL"], "tile_mpp": 0.27, "img_size": 32, "teacher_depth": 4,
         "epochs": 1, "batch_size": 8, "val_frac": 0.25, "threads": 2, "out": str(tmp_path / "runs" / "{role}"),
         "mdkd": {"block_map": [[1, 2], [2, 3], [3, 4]]}} | over
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("over, message", [
    ({"suspicious_classes": ["blast"]}, "suspicious classes ['blast'] are not among the data's classes"),
    ({"suspicious_classes": []}, "suspicious_classes is empty"),
    ({"data": "nowhere"}, "data folder not found"),
    ({"exclude": "missing.txt"}, "exclude list not found"),
    ({"img_size": 40}, "img_size 40 is not a multiple of patch_size 16"),
    ({"epochs": "ten"}, "field epochs: 'ten' is not int"),
    ({"tile_mpp": None}, "tile_mpp is not set"),
    ({"tile_mpp": 270}, "tile_mpp 270"),
    ({"tile_size": 5000}, "tile_size 5000: expected 16 - 4096"),
    ({"img_size": 8192}, "img_size 8192: at most 4096"),
    ({"group_pattern": "nomatch_(\\d+)"}, "matches none of the"),
    ({"group_pattern": "(unclosed"}, "not a regular expression"),
    ({"bf16": "yes"}, "field bf16"),
    ({"mode": "mdkd", "teacher": "none.safetensors"}, "none.safetensors"),
])
def test_config_problems_are_one_line_before_training(tmp_path, over, message):
    data = _cells(tmp_path / "cells", {"HSIL": "erythroblast", "NILM": "neutrophil"}, n=4)
    # a broken image: decoding would fail, so any other error proves nothing was decoded yet
    (data / "NILM" / "broken.jpg").write_bytes(b"not a jpeg")
    if over.get("data") == "nowhere":
        data, over = tmp_path / "nowhere", {}
    cfg = _base_config(tmp_path, data, **over)
    cmd = "distill" if over.get("mode") else "train-teacher"
    r = CliRunner().invoke(main, [cmd, "--config", str(cfg)])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {cfg}: "), r.stderr
    assert message in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "runs").exists()  # nothing started


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "proj" / "conf").mkdir(parents=True)
    (tmp_path / "proj" / "lists").mkdir()
    (tmp_path / "proj" / "lists" / "ex.txt").write_text("")
    cfg = tmp_path / "proj" / "conf" / "c.yaml"
    cfg.write_text("data: ../cells\nexclude: ../lists/ex.txt\nout: runs/{role}\ntile_mpp: 0.5\n"
                   "suspicious_classes: [a]\n")
    monkeypatch.chdir(tmp_path)
    c = load_config("proj/conf/c.yaml", {"teacher": "t.safetensors"})
    assert Path(c.data) == Path("proj/cells") and Path(c.exclude) == Path("proj/lists/ex.txt")
    assert Path(c.out) == Path("proj/conf/runs/{role}")
    assert c.teacher == "t.safetensors"  # a command-line value stays relative to the working directory
    # the shipped configs resolve to the same places as before (repo-relative)
    monkeypatch.chdir(ROOT)
    t = load_config("configs/distill_pbc_teacher.yaml")
    assert (t.data, t.exclude, t.out, t.cache_dir) == ("../shared/data/pbc", "configs/pbc_heldout.txt",
                                                       "runs/pbc/teacher", "runs/cache")


def test_export_settings_change_without_retraining(tmp_path):
    data = _cells(tmp_path / "cells", {"HSIL": "erythroblast", "NILM": "neutrophil", "SCC": "ig"}, n=6)
    cfg = _base_config(tmp_path, data)
    _distill(["train-teacher", "--config", str(cfg), "--quiet"])
    run = tmp_path / "runs" / "teacher"
    first = read_metadata(run / "model.safetensors")
    assert first["suspicious_classes"] == ["HSIL"] and first["tile_mpp"] == 0.27
    # fixing only export settings in the config resumes the finished run instead of refusing it
    cfg2 = _base_config(tmp_path, data, suspicious_classes=["HSIL", "SCC"], tile_mpp=0.25, stain="pap")
    r = _distill(["train-teacher", "--config", str(cfg2)])
    assert "resumed from epoch 1" in r.output and "export settings changed" in r.output
    again = read_metadata(run / "model.safetensors")
    assert again["suspicious_classes"] == ["HSIL", "SCC"] and again["tile_mpp"] == 0.25 and again["stain"] == "pap"
    # ... and so does a change of a student-only field (one config serves both roles)
    r = _distill(["train-teacher", "--config", str(_base_config(tmp_path, data, mode="kd", kd_tau=2.0,
                                                               suspicious_classes=["HSIL", "SCC"], tile_mpp=0.25,
                                                               stain="pap"))])
    assert "resumed from epoch 1" in r.output
    # ... while a training setting still refuses, naming it
    cfg3 = _base_config(tmp_path, data, lr=0.01)
    r = CliRunner().invoke(main, ["train-teacher", "--config", str(cfg3)])
    assert r.exit_code == 2 and "different config (lr differ)" in r.stderr
    # re-export with other settings: same weights, new metadata, no training
    out = tmp_path / "fixed.safetensors"
    _distill(["export", str(run), "--out", str(out), "--fp32", "--suspicious", "SCC", "--tile-mpp", "0.5",
              "--tile-size", "96", "--stain", "romanowsky", "--placement", "cells"])
    m = read_metadata(out)
    assert (m["suspicious_classes"], m["tile_mpp"], m["tile_size"], m["stain"], m["placement"]) == \
        (["SCC"], 0.5, 96, "romanowsky", "cells")
    assert m["provenance"]["export_overrides"]["tile_mpp"] == 0.5
    a, _ = load_model_file(run / "model.safetensors")
    b, _ = load_model_file(out)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    from wsi_pipeline.scoring import read_checkpoint_info

    info = read_checkpoint_info(out)
    assert info.tile_mpp == 0.5 and info.suspicious_classes == ("SCC",)
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "x.safetensors"), "--suspicious", "blast"])
    assert r.exit_code == 2 and "['blast']" in r.stderr and not (tmp_path / "x.safetensors").exists()


def test_evaluate_a_subset_of_the_checkpoint_classes_with_background(tmp_path):
    """A model with a ``background`` class that sorts first, scored on two of its cell folders."""
    data = _cells(tmp_path / "train", {"background": "platelet", "HSIL": "erythroblast", "NILM": "neutrophil",
                                       "SCC": "ig"}, n=6)
    cfg = _base_config(tmp_path, data)
    _distill(["train-teacher", "--config", str(cfg), "--quiet"])
    ckpt = tmp_path / "runs" / "teacher" / "model.safetensors"
    assert read_metadata(ckpt)["class_names"] == ["HSIL", "NILM", "SCC", "background"]
    sub = _cells(tmp_path / "sub", {"SCC": "ig", "HSIL": "erythroblast"}, n=5)
    r = _distill(["evaluate", str(ckpt), "--data", str(sub), "--split", "all", "--out", str(tmp_path / "rep"),
                  "--bench-batches", "1", "--quiet"])
    rep = json.loads((tmp_path / "rep" / "teacher.json").read_text())
    assert rep["n_images"] == 10 and rep["data_classes"] == ["HSIL", "SCC"]
    assert rep["per_class"]["HSIL"]["support"] == 5 and rep["per_class"]["background"]["support"] == 0
    assert rep["per_class"]["NILM"]["support"] == 0
    # 'val' of other data is not defined: one line that says what to do
    r = CliRunner().invoke(main, ["evaluate", str(ckpt), "--data", str(sub), "--out", str(tmp_path / "rep2")])
    assert r.exit_code == 2 and "--split all" in r.stderr
    # a class the model does not know is refused by name before any image is decoded
    (sub / "blast").mkdir()
    (sub / "blast" / "broken.jpg").write_bytes(b"not a jpeg")
    r = CliRunner().invoke(main, ["evaluate", str(ckpt), "--data", str(sub), "--split", "all", "--out",
                                  str(tmp_path / "rep3")])
    assert r.exit_code == 2 and "['blast']" in r.stderr and "cannot read image" not in r.stderr


def _rotated_copies(dst: Path, n: int = 8) -> Path:
    """Each of ``n`` real cells per class saved at 0, 90, 180 and 270 degrees: <cell>_rot<deg>.png."""
    for name, src in {"HSIL": "erythroblast", "NILM": "neutrophil", "SCC": "ig"}.items():
        (dst / name).mkdir(parents=True)
        for f in sorted((CELLS / src).iterdir())[:n]:
            with Image.open(f) as im:
                for deg in (0, 90, 180, 270):
                    im.rotate(deg).save(dst / name / f"{f.stem}_rot{deg}.png")
    return dst


def test_group_pattern_keeps_copies_of_a_cell_on_one_side(tmp_path):
    data = _rotated_copies(tmp_path / "rot")
    rels, labels, _ = scan_imagefolder(data)
    labels = torch.tensor(labels)
    cell = [r.rsplit("_rot", 1)[0] for r in rels]

    def straddling(tr, va):
        return {cell[i] for i in tr.tolist()} & {cell[i] for i in va.tolist()}

    assert straddling(*stratified_split(labels, 0.25, 0))  # the plain split leaks copies
    groups = group_keys(rels, r"(.+)_rot\d+")
    assert len(set(groups)) == 24
    tr, va = stratified_split(labels, 0.25, 0, groups)
    assert not straddling(tr, va) and len(tr) + len(va) == len(rels)
    assert torch.bincount(labels[va]).tolist() == [8, 8, 8]  # 2 of 8 cells per class, 4 copies each
    tr2, va2 = stratified_split(labels, 0.25, 0, groups)
    assert torch.equal(va, va2)
    # through training: the split is recorded with its pattern, and a student must use the same
    cfg = _base_config(tmp_path, data, group_pattern=r"(.+)_rot\d+")
    _distill(["train-teacher", "--config", str(cfg), "--quiet"])
    meta = read_metadata(tmp_path / "runs" / "teacher" / "model.safetensors")
    assert meta["provenance"]["split"] == {"seed": 0, "val_frac": 0.25, "group_pattern": r"(.+)_rot\d+"}
    assert json.loads((tmp_path / "runs" / "teacher" / "result.json").read_text())["n_val"] == 24
    r = CliRunner().invoke(main, ["distill", "--config", str(cfg), "--mode", "kd", "--set", "group_pattern=null",
                                  "--teacher", str(tmp_path / "runs" / "teacher" / "model.safetensors")])
    assert r.exit_code == 2 and "another train/val split" in r.stderr


def test_bf16_is_decided_from_the_cpu_flags(tmp_path):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    native, why = cpu_native_bf16()
    assert native == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    rt = resolve_runtime("cpu", "auto")
    assert rt.device.type == "cpu" and rt.bf16 == native and ("bf16" if native else "fp32") in rt.reason
    assert resolve_runtime("cpu", False).bf16 is False
    avx2 = tmp_path / "cpuinfo"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    assert cpu_native_bf16(avx2) == (False, "no avx512_bf16/amx_bf16 (avx2 only)")
    amx = tmp_path / "cpuinfo2"
    amx.write_text("flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_native_bf16(amx) == (True, "avx512_bf16+amx_bf16")


def test_demo_student_on_held_out_cells_fp32_and_bf16_agree(tmp_path):
    """The bundled 9-class student (with background) scored on the 336 shipped held-out cells
    (8 classes: a subset), in fp32 and bf16: same predictions on nearly every cell."""
    r = _distill(["evaluate", str(DEMO), "--data", str(CELLS), "--split", "all", "--out", str(tmp_path),
                  "--bench-batches", "1", "--set", "threads=2", "--quiet"])
    rep = json.loads(r.stdout)
    pc = rep["precision_check"]
    assert rep["n_images"] == 336
    assert pc["top1_fp32"] >= 0.85  # held-out cells none of the models saw
    assert pc["same_prediction"] >= 0.98 and abs(pc["top1_fp32"] - pc["top1_bf16"]) <= 0.01


def test_precision_benchmark_prints_both_and_the_losses_agree():
    from distill.bench_precision import time_precisions

    r = time_precisions("tiny", img_size=32, depth=2, batch=8, steps=1, device="cpu", warmup=0)
    assert r["fp32_s_per_step"] > 0 and r["bf16_s_per_step"] > 0 and r["bf16_speedup"] > 0
    assert abs(r["first_loss_fp32"] - r["first_loss_bf16"]) < 0.02  # same weights, same batch
    assert r["auto_uses_bf16"] == cpu_native_bf16()[0]
