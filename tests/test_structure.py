"""The package layout's rules, checked on the source (issue #10).

- ``wsi_contracts`` (the file formats both sides share) is at the bottom: it imports neither
  ``wsi_pipeline`` nor ``distill``;
- ``distill`` imports nothing from outside itself except ``wsi_contracts``;
- a stage package of ``wsi_pipeline`` uses another stage only through that stage's package (its
  ``__init__`` exports), never one of its modules, and no stage imports the orchestration on top
  (``pipeline``, ``cli``, ``verify``);
- no private or deprecated API of zarr, tifffile or timm is imported.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("slides", "foreground", "tiling", "scoring", "aggregation", "review", "synth")
ORCHESTRATION = ("wsi_pipeline.pipeline", "wsi_pipeline.cli", "wsi_pipeline.verify", "wsi_pipeline.__main__")
#: deprecated names of the libraries we use (zarr: the Blosc enums and the sharding index-location
#: enum take literal strings now)
DEPRECATED = {"zarr": {"BloscShuffle", "BloscCname", "ShardingCodecIndexLocation"}}


def _modules(package: str) -> list[tuple[str, Path]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) for every import in the file, function-level ones too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module
            found.append((node.lineno, name, [alias.name for alias in node.names]))
    return found


def _targets(name: str, names: list[str]) -> list[str]:
    """The modules an import reaches: ``from pkg import mod`` reaches ``pkg.mod`` when that is a module."""
    out = [name]
    for n in names:
        candidate = ROOT / Path(*f"{name}.{n}".split("."))
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            out.append(f"{name}.{n}")
    return out


def _all_imports(packages=("wsi_contracts", "wsi_pipeline", "distill")):
    for package in packages:
        for module, path in _modules(package):
            for line, name, names in _imports(module, path):
                yield module, f"{path.relative_to(ROOT)}:{line}", name, names


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "wsi_pipeline" and parts[1] in STAGES else None


def test_the_contracts_package_depends_on_neither_side():
    bad = [f"{where} imports {name}" for module, where, name, _ in _all_imports(("wsi_contracts",))
           if name.split(".")[0] in ("wsi_pipeline", "distill")]
    assert not bad, "\n".join(bad)


def test_distill_imports_only_the_contracts_from_outside_itself():
    bad = [f"{where} imports {name}" for module, where, name, _ in _all_imports(("distill",))
           if name.split(".")[0] == "wsi_pipeline"]
    assert not bad, "\n".join(bad)


def test_a_stage_uses_another_stage_only_through_its_package():
    bad = []
    for module, where, name, names in _all_imports(("wsi_pipeline",)):
        here = _stage(module)
        for target in _targets(name, names):
            there = _stage(target)
            if there and there != here and target != f"wsi_pipeline.{there}":
                bad.append(f"{where} ({module}) reaches into {target}")
            if here and target in ORCHESTRATION:
                bad.append(f"{where} ({module}) imports the orchestration module {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_private_or_deprecated_library_api():
    bad = []
    for packages in (("wsi_contracts", "wsi_pipeline", "distill"),):
        for module, where, name, names in _all_imports(packages):
            top = name.split(".")[0]
            if top not in ("zarr", "tifffile", "timm", "numcodecs", "imagecodecs", "openslide"):
                continue
            if any(part.startswith("_") for part in name.split(".")[1:]) or name.startswith("zarr.core"):
                bad.append(f"{where}: private module {name}")
            private = [n for n in names if n.startswith("_")]
            if private:
                bad.append(f"{where}: private names {private} from {name}")
            deprecated = sorted(set(names) & DEPRECATED.get(top, set()))
            if deprecated:
                bad.append(f"{where}: deprecated {deprecated} from {name}")
            if name == "tifffile.tifffile":  # the implementation module: only what tifffile exports
                import tifffile
                hidden = [n for n in names if n not in tifffile.__all__]
                if hidden:
                    bad.append(f"{where}: {hidden} are not tifffile's public API")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["wsi_contracts", "wsi_pipeline", "distill"])
def test_public_modules_declare_their_api(package):
    missing = []
    for module, path in _modules(package):
        if path.name in ("__main__.py",) or module.split(".")[-1].startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defines = any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
                      for n in tree.body)
        declares = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                       for n in tree.body)
        if defines and not declares:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, "modules without __all__: " + ", ".join(missing)


def test_the_rules_find_a_violation(tmp_path):
    """The checker itself: a stage module importing another stage's module is reported."""
    source = "from ..slides.reader import open_slide\nfrom ..slides import open_slide as ok\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    found = [t for _, name, names in _imports("wsi_pipeline.tiling.x", path) for t in _targets(name, names)]
    assert "wsi_pipeline.slides.reader" in found and "wsi_pipeline.slides" in found
    assert _stage("wsi_pipeline.slides.reader") == "slides" and _stage("wsi_pipeline.pipeline") is None
