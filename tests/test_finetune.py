"""distill.finetune: head extension, a few real training steps on a tiny ImageFolder, the
checkpoint it writes (contract, provenance, kept metadata) and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from click.testing import CliRunner

from distill.cli import main
from distill.errors import DistillError
from distill.export import build_metadata, export, load_model_file, write_checkpoint
from distill.finetune import FinetuneConfig, extend_head, run_finetune
from distill.models import build_vit
from wsi_contracts.checkpoint import file_sha256
from wsi_pipeline.scoring import read_checkpoint_info

OLD = ["blast", "normal"]
ARCH = {"family": "timm-vit", "img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3,
        "mlp_ratio": 4.0, "num_classes": len(OLD), "class_token": True, "global_pool": "token"}


def _init_checkpoint(path: Path) -> Path:
    """A student like the demo's: a stain preset, out-of-domain statistics and a score calibration."""
    torch.manual_seed(0)
    model = build_vit(ARCH)
    md = build_metadata(ARCH, OLD, ["blast"], (0.5,) * 3, (0.25,) * 3, 32, 128, 0.27,
                        {"role": "student", "data_fingerprint": "x", "metrics": {"val_top1": 0.5}})
    md["stain"] = "romanowsky"
    md["ood"] = {"method": "mahalanobis_tied", "layer": "pre_logits", "threshold": 12.5}
    md["calibration"] = {"grid": {"slope": 10.0, "intercept": -8.0, "method": "topk_mean", "top_k": 3}}
    ood = {"ood.class_means": torch.randn(len(OLD), ARCH["embed_dim"]), "ood.precision": torch.eye(ARCH["embed_dim"])}
    write_checkpoint(path, model.state_dict() | ood, md)
    return path


def _folder(root: Path, spec: dict[str, int], seed: int = 0) -> Path:
    """Small coloured images: 'blast' dark blue blobs, 'normal' pink, 'background' near white."""
    rng = np.random.default_rng(seed)
    base = {"blast": (70, 60, 150), "normal": (220, 150, 160), "background": (235, 235, 235)}
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(np.array(base[cls]) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f"{cls}_{i:03d}.png")
    return root


def test_extend_head_keeps_old_logits(tmp_path):
    model, _ = load_model_file(_init_checkpoint(tmp_path / "init.safetensors"))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        extend_head(model, 1)
        after = model(x)
    assert after.shape == (6, len(OLD) + 1)
    torch.testing.assert_close(after[:, : len(OLD)], before)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_finetune_adds_background_and_writes_a_contract_checkpoint(tmp_path):
    init = _init_checkpoint(tmp_path / "init.safetensors")
    data = _folder(tmp_path / "set", {"blast": 12, "normal": 12, "background": 12})
    exclude = tmp_path / "heldout.txt"
    exclude.write_text("# never train on these\nblast/blast_000.png\nnormal/normal_000.png\n")
    cfg = FinetuneConfig(init=str(init), data=[str(data)], out=str(tmp_path / "run"), exclude=str(exclude),
                         add_class=["background"], epochs=2, samples_per_epoch=32, batch_size=16, lr=1e-3,
                         warmup_steps=1, threads=1, cache_dir=None, val_frac=0.25)
    threads = torch.get_num_threads()
    metrics = run_finetune(cfg)
    assert metrics["steps"] == 4
    assert torch.get_num_threads() == threads  # threads=1 held for the run only, not left set
    model, meta = load_model_file(tmp_path / "run" / "model.safetensors")
    # the one training loop makes a fine-tune resumable: started again it trains nothing more
    again = run_finetune(cfg)
    assert again["steps"] == 4 and [h["epoch"] for h in again["history"]] == [1, 2]
    resumed, _ = load_model_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert meta["class_names"] == OLD + ["background"]
    assert meta["architecture"]["num_classes"] == 3
    assert meta["suspicious_classes"] == ["blast"]
    prov = meta["provenance"]
    assert prov["init_sha256"] == file_sha256(init)
    assert prov["data"][0]["n"] == 34  # the two excluded images are not there
    assert prov["split"] == {"seed": 0, "val_frac": 0.25}
    assert prov["metrics"]["val_top1"] == metrics["val_top1"]
    # the weights changed from the init checkpoint (training really ran), old rows included
    init_model, _ = load_model_file(init)
    assert not torch.equal(model.head.weight[: len(OLD)], init_model.head.weight)
    # the init's stain is kept; its OOD statistics and calibration, fitted on the old outputs, are not
    assert meta["stain"] == "romanowsky" and "ood" not in meta and "calibration" not in meta
    assert read_checkpoint_info(tmp_path / "run" / "model.safetensors").ood is None
    # the fp16 export keeps extra metadata such as the stain
    out = tmp_path / "demo.safetensors"
    export(tmp_path / "run" / "model.safetensors", out, fp16=True)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        raw = f.metadata()
        assert f.get_tensor("head.weight").dtype == torch.float16
    assert raw["stain"] == "romanowsky"
    assert json.loads(raw["class_names"]) == OLD + ["background"]
    # and the pipeline's loader accepts it
    info = read_checkpoint_info(out)
    assert info.num_classes == 3


def test_unknown_class_without_add_class_is_a_user_error(tmp_path):
    init = _init_checkpoint(tmp_path / "init.safetensors")
    data = _folder(tmp_path / "set", {"blast": 4, "background": 4})
    cfg = FinetuneConfig(init=str(init), data=[str(data)], out=str(tmp_path / "run"), epochs=1,
                         samples_per_epoch=8, batch_size=8, threads=1, cache_dir=None)
    with pytest.raises(DistillError, match="background"):
        run_finetune(cfg)
    r = CliRunner().invoke(main, ["finetune", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "run2"),
                                  "--add-class", "blast"])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "already among" in r.stderr
    assert not (tmp_path / "run2").exists()  # refused before anything was written
