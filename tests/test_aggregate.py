"""Aggregation: slide score methods, heatmap, overlay, gallery, QuPath GeoJSON and summary.json."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
from ckpt_util import random_checkpoint
from pipeline_util import blob_field, tiled_store
from PIL import Image

from wsi_contracts import tilestore as tile_store
from wsi_pipeline.aggregation import (AggregateConfig, aggregate_store, heatmap_grid, overlay_image, slide_score,
    tile_suspicion)
from wsi_pipeline.errors import OptionError, StoreError
from wsi_pipeline.aggregation import class_colour, geojson_collection, mask_outline
from wsi_pipeline.scoring import read_scores, score_store
from wsi_pipeline.tiling import TilerConfig, tile_slide


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("aggregate")
    store = tiled_store(blob_field(root / "field.png", seed=7, n=18), root / "out")
    ckpt = random_checkpoint(root / "a.safetensors", seed=2)
    result = score_store(store, ckpt)
    return {"root": root, "store": store, "ckpt": ckpt, "sha": result.checkpoint_sha256}


def test_tile_suspicion_sums_the_suspicious_classes():
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]], dtype=np.float32)
    s = tile_suspicion(probs, ["a", "b", "c"], ["b", "c"])
    np.testing.assert_allclose(s, [0.9, 0.5], atol=1e-6)


def test_slide_score_methods():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    assert slide_score(s, AggregateConfig(top_k=2)) == pytest.approx(0.8)
    assert slide_score(s, AggregateConfig(top_k=50)) == pytest.approx(s.mean())  # k larger than the slide
    assert slide_score(s, AggregateConfig(method="quantile", quantile=0.5)) == pytest.approx(0.5)
    assert slide_score(s, AggregateConfig(method="fraction_above", threshold=0.45)) == pytest.approx(0.6)
    assert slide_score(np.zeros(0), AggregateConfig()) is None
    with pytest.raises(OptionError, match="method must be one of topk_mean, quantile, fraction_above, got 'max'"):
        AggregateConfig(method="max").validated()


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 0, "top_k must be >= 1, got 0"),
    ("gallery_k", -1, "gallery_k must be >= 0, got -1"),
    ("quantile", 2.0, r"quantile must be in \[0, 1\], got 2.0"),
    ("threshold", -0.1, r"threshold must be in \[0, 1\], got -0.1"),
    ("overlay_alpha", 1.5, r"overlay_alpha must be in \[0, 1\], got 1.5"),
])
def test_parameter_errors_name_the_parameter(field, value, message):
    with pytest.raises(OptionError, match=message) as caught:
        AggregateConfig(**{field: value}).validated()
    assert caught.value.param == field and not isinstance(caught.value, StoreError)


def test_overlay_tints_scored_tiles_by_suspicion_above_the_floor_and_outlines_the_mask():
    thumb = np.full((16, 16, 3), 200, dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:14, 2:6] = True  # a tissue patch in the left column of tiles
    # 2x2 grid of 8x8 px cells: high, middling / below the floor, none
    heat = np.array([[1.0, 0.5], [0.1, np.nan]], dtype=np.float32)
    grid = {"stride": [8, 8], "origin": [0, 0]}
    out = overlay_image(thumb, mask, heat, grid, 1.0, alpha=0.8, floor=0.2).astype(int)
    off_rim = ~mask_outline(mask)
    change = np.abs(out - 200).sum(axis=-1)
    assert (change[8:, 8:] == 0).all()  # no tile: untouched
    assert (change[8:, :8][off_rim[8:, :8]] == 0).all()  # below the floor: untouched (only the mask rim is drawn)
    assert change[0, 10] > 0 and change[0, 0] > change[0, 10]  # drawn with opacity growing with suspicion
    assert out[0, 0, 0] > out[0, 0, 2]  # suspicion 1 is yellow on viridis
    rim = mask_outline(mask)
    assert rim.sum() == 2 * 12 + 2 * 2  # a one-pixel outline, not a fill
    assert (out[rim] < 200).all() and (out[5, 4] == out[5, 7]).all()  # rim darkened, inside the mask not filled
    opaque = overlay_image(thumb, np.ones((16, 16), bool), heat, grid, 1.0, alpha=1.0, floor=0.0).astype(int)
    assert opaque[10, 4, 2] > opaque[10, 4, 1]  # suspicion 0.1 is dark purple-blue


def test_overlay_picture_is_large_bounded_and_heatmap_has_a_legend():
    from wsi_pipeline.aggregation.outputs import OVERLAY_MAX_SIDE, OVERLAY_MIN_SIDE, heatmap_picture, overlay_picture

    heat = np.array([[1.0, 0.5], [0.1, np.nan]], dtype=np.float32)
    for side in (64, 5000):  # a small thumbnail is enlarged, a large one reduced
        thumb = np.full((side // 2, side, 3), 200, dtype=np.uint8)
        png = overlay_picture(thumb, np.ones(thumb.shape[:2], bool), heat, {"stride": [side / 2, side / 4]}, 1.0, 0.6,
                              "slide: topk_mean = 0.9")
        with Image.open(io.BytesIO(png)) as im:
            assert OVERLAY_MIN_SIDE <= max(im.size) <= OVERLAY_MAX_SIDE + 400  # the picture plus title and colour bar
    with Image.open(io.BytesIO(heatmap_picture(heat, "slide"))) as im:
        assert min(im.size) > 500  # enlarged, with a colour bar beside it


def test_overlay_picture_holds_the_overlay_pixel_for_pixel_with_its_lettering():
    from wsi_pipeline.aggregation.outputs import overlay_image, overlay_picture, overlay_scale

    rng = np.random.default_rng(3)
    thumb = rng.integers(0, 255, (1700, 1800, 3), dtype=np.uint8)  # inside the picture's size bounds: scale 1
    assert overlay_scale(thumb.shape) == 1.0
    mask = np.ones(thumb.shape[:2], bool)
    heat = np.array([[1.0, 0.5], [0.1, np.nan]], dtype=np.float32)
    grid = {"stride": [850, 900]}
    png = overlay_picture(thumb, mask, heat, grid, 1.0, 0.6, "slide: topk_mean = 0.9")
    expected = overlay_image(thumb, mask, heat, grid, 1.0, 0.6)
    with Image.open(io.BytesIO(png)) as im:
        picture = np.asarray(im.convert("RGB"))
    top, left = 130, 20  # the title and its note above, a margin on the left
    assert picture.shape == (1700 + top + 20, 1800 + left + 300, 3)
    np.testing.assert_array_equal(picture[top:top + 1700, left:left + 1800], expected[..., :3])
    assert (picture[:top] < 100).any(axis=-1).sum() > 500  # the title is written above it
    bar = picture[top:top + 1700, left + 1800 + 50:left + 1800 + 86]
    assert len(np.unique(bar.reshape(-1, 3), axis=0)) > 50  # and the colour bar beside it


def test_aggregate_writes_outputs_consistent_with_the_scores(scored, tmp_path):
    result = aggregate_store(scored["store"], tmp_path / "o", AggregateConfig(top_k=5, gallery_k=6))
    group = tile_store.open_store(scored["store"])
    meta = tile_store.read_meta(group)
    probs, attrs = read_scores(group, scored["sha"])
    susp = tile_suspicion(probs, attrs.class_names, attrs.suspicious_classes)
    coords = np.asarray(group["coords"][:])
    grid = np.asarray(group["grid"][:])
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    top5 = np.sort(susp)[-5:].mean()
    assert summary["score"] == {"value": pytest.approx(top5, abs=1e-5), "raw": pytest.approx(top5, abs=1e-5),
                                "method": "topk_mean", "settings": {"top_k": 5}, "over": "tiles",
                                "calibration": None}  # a grid store, a checkpoint without a calibration
    assert summary["tiles"]["n_tiles"] == meta["n_tiles"] == len(susp)
    top = summary["top_tiles"]
    assert len(top) == 6 and [t["suspicion"] for t in top] == sorted((t["suspicion"] for t in top), reverse=True)
    for t in top:
        assert [t["x"], t["y"], t["w"], t["h"]] == coords[t["index"]].tolist()
        assert t["suspicion"] == pytest.approx(susp[t["index"]], abs=1e-6)
    prov = summary["provenance"]
    assert prov["slide_fingerprint"] == meta["slide_fingerprint"]
    assert prov["tiler_config_hash"] == meta["tiler_config_hash"]
    assert prov["checkpoint_sha256"] == scored["sha"]
    assert prov["checkpoint_metadata"]["class_names"] == list(attrs.class_names)
    assert prov["versions"]["wsi-triage"] and prov["versions"]["torch"] and prov["versions"]["zarr"]

    heat = np.load(tmp_path / "o" / "heatmap.npy")
    assert heat.shape == tuple(meta["grid"]["shape"])
    np.testing.assert_allclose(heat[grid[:, 0], grid[:, 1]], susp, atol=1e-6)
    assert np.isnan(heat).sum() == heat.size - len(susp)
    np.testing.assert_array_equal(np.isnan(heat), np.isnan(heatmap_grid(susp, grid, heat.shape)))
    for name in ("overlay.png", "heatmap.png", "gallery.png"):
        with Image.open(tmp_path / "o" / name) as im:
            im.verify()


def test_geojson_is_qupath_detections_with_measurements(scored, tmp_path):
    aggregate_store(scored["store"], tmp_path / "g", AggregateConfig(geojson_gzip=True))
    group = tile_store.open_store(scored["store"])
    probs, attrs = read_scores(group, scored["sha"])
    coords = np.asarray(group["coords"][:])
    path = tmp_path / "g" / f"{scored['store'].stem}.geojson.gz"
    doc = json.loads(gzip.decompress(path.read_bytes()))
    width, height = tile_store.read_meta(group)["slide_dimensions"]
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(probs)
    assert doc["metadata"]["checkpoint_sha256"] == scored["sha"]
    assert doc["metadata"]["slide_fingerprint"] == tile_store.read_meta(group)["slide_fingerprint"]
    ids = set()
    for i, feat in enumerate(doc["features"]):
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == attrs.class_names[int(probs[i].argmax())]
        assert props["classification"]["color"] == class_colour(props["classification"]["name"])
        m = props["measurements"]
        assert set(m) == {f"prob_{c}" for c in attrs.class_names} | {"suspicion"}
        assert m["suspicion"] == pytest.approx(probs[i][[2, 3]].sum(), abs=1e-5)
        x, y, w, h = coords[i].tolist()
        ring = feat["geometry"]["coordinates"][0]
        assert feat["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] == [x, y]
        assert ring[2] == [min(x + w, width), min(y + h, height)]  # clipped to the image
        ids.add(feat["id"])
    assert len(ids) == len(probs)


def test_unchanged_aggregation_is_a_no_op_and_new_settings_rewrite(scored, tmp_path):
    first = aggregate_store(scored["store"], tmp_path / "n")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "n").iterdir()}
    again = aggregate_store(scored["store"], tmp_path / "n")
    assert again.reused and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "n").iterdir()} == mtimes
    other = aggregate_store(scored["store"], tmp_path / "n", AggregateConfig(method="quantile", quantile=0.9))
    assert not other.reused and other.summary["score"]["method"] == "quantile"
    assert other.summary["score"]["settings"] == {"quantile": 0.9}
    assert first.summary["aggregation_key"] != other.summary["aggregation_key"]


def test_aggregate_reports_each_output_written_through_the_progress_protocol(scored, tmp_path):
    calls = []
    first = aggregate_store(scored["store"], tmp_path / "p", progress=lambda *call: calls.append(call))
    n = len(first.paths)
    assert calls == [("aggregating", i, n) for i in range(n + 1)]  # the plan, then one call per file written
    calls.clear()
    assert aggregate_store(scored["store"], tmp_path / "p", progress=lambda *call: calls.append(call)).reused
    assert calls == [("aggregating", n, n)]


def test_aggregate_needs_scores(tmp_path):
    store = tiled_store(blob_field(tmp_path / "f.png", seed=3), tmp_path / "out")
    with pytest.raises(StoreError, match="no complete scores"):
        aggregate_store(store, tmp_path / "o")


def test_store_without_tissue_gives_no_score(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 300, 3), 238, dtype=np.uint8)).save(blank)
    result = tile_slide(blank, tmp_path / "out", TilerConfig(target_mpp=0.5, tile_size=32), mpp=0.5)
    assert result.n_tiles == 0
    score_store(result.path, random_checkpoint(tmp_path / "a.safetensors"))
    agg = aggregate_store(result.path, tmp_path / "o")
    assert agg.score is None and agg.summary["tiles"]["n_tiles"] == 0 and agg.summary["empty_reason"]
    assert json.loads((tmp_path / "o" / "blank.geojson").read_text())["features"] == []


def test_geojson_features_are_clipped_to_the_image_bounds():
    coords = np.array([[0, 0, 10, 10], [95, 45, 10, 10], [100, 0, 10, 10]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    doc = geojson_collection(coords, probs, probs[:, 1], ["neutrophil", "ig"], {}, bounds=(100, 50))
    rings = [f["geometry"]["coordinates"][0] for f in doc["features"]]
    assert rings == [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]],
                     [[95, 45], [100, 45], [100, 50], [95, 50], [95, 45]]]  # the third lies outside: dropped
    assert [f["properties"]["classification"]["color"] for f in doc["features"]] == [
        class_colour("neutrophil"), class_colour("ig")]


def test_results_and_synthetic_truth_share_class_colours():
    from wsi_pipeline.synth.truth import _geojson_features

    doc = {"cells_source": {"classes": ["ig", "neutrophil", "thyroid-follicular"]},
           "cells": [{"bbox": [0, 0, 5, 5], "class": c, "suspicious": False, "source": "x"}
                     for c in ("ig", "neutrophil", "thyroid-follicular")],
           "planted_regions": [], "artifacts": {"pen": {"bbox": [0, 0, 1, 1]}, "blur": {"bbox": [0, 0, 1, 1]}}}
    truth = json.loads("".join(_geojson_features(doc)))
    colours = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
               for f in truth["features"]}
    for name in ("ig", "neutrophil", "thyroid-follicular", "Pen mark"):
        assert colours[name] == class_colour(name)
    assert class_colour("ig") != class_colour("neutrophil")


# --------------------------------------------------------------------------- aggregation by object ("cells" stores)


@pytest.fixture(scope="module")
def cells_scored(tmp_path_factory):
    """A synthetic smear of real cells tiled with the cells placement and scored with the demo student."""
    from pipeline_util import cells_dir, smear

    from wsi_pipeline.scoring import read_checkpoint_info

    root = tmp_path_factory.mktemp("aggregate-cells")
    cells = cells_dir(None)
    if cells is not None:
        pytest.skip("the shipped cells are needed for this smear")
    slide = root / "smear.tiff"
    smear(slide, cells, fraction=0.3, seed=5, size=1536)
    info = read_checkpoint_info(None)
    config = TilerConfig(target_mpp=info.tile_mpp, tile_size=info.tile_size, stain="romanowsky", tiling="cells")
    store = tile_slide(slide, root / "out", config, workers=1).path
    result = score_store(store, info.path)
    return {"root": root, "store": store, "sha": result.checkpoint_sha256}


def test_object_suspicion_is_the_max_over_its_tiles():
    from wsi_pipeline.aggregation import object_best_tile, object_suspicion

    s = np.array([0.1, 0.7, 0.3, 0.2, 0.9], np.float32)
    owner = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(object_suspicion(s, owner, 3), [0.7, 0.3, 0.9])
    assert list(object_best_tile(s, owner, 3)) == [1, 2, 4]


def test_cells_store_is_aggregated_by_object(cells_scored, tmp_path):
    from wsi_pipeline.tiling import read_objects

    group = tile_store.open_store(cells_scored["store"])
    objects, tile_object = read_objects(group)
    probs, attrs = read_scores(group, cells_scored["sha"])
    suspicion = tile_suspicion(probs, attrs.class_names, attrs.suspicious_classes)
    per_object = np.array([suspicion[tile_object == i].max() for i in range(len(objects))])
    result = aggregate_store(cells_scored["store"], tmp_path / "agg", AggregateConfig(top_k=3))
    summary = result.summary
    assert summary["score"]["over"] == "objects"
    expected = float(np.sort(per_object)[-3:].mean())
    assert summary["score"]["raw"] == pytest.approx(expected, abs=1e-5)
    obj = summary["objects"]
    assert obj["n_objects"] == len(objects) < summary["tiles"]["n_tiles"] + 1
    assert obj["above_threshold"] == int(np.sum(per_object > 0.5))
    assert obj["fraction_above"] == pytest.approx(np.mean(per_object > 0.5), abs=1e-6)
    assert obj["singles"] + obj["groups"] == len(objects)
    top = obj["top_objects"][0]
    assert top["suspicion"] == pytest.approx(per_object.max(), abs=1e-5)
    # GeoJSON: one detection per object, its box, measurements
    features = json.loads(result.paths["geojson"].read_text())["features"]
    assert len(features) == len(objects)
    ring = features[top["object"]]["geometry"]["coordinates"][0]
    x, y, w, h = objects.bbox[top["object"]]
    assert ring[0] == [int(x), int(y)] and ring[2] == [int(x + w), int(y + h)]
    m = features[top["object"]]["properties"]["measurements"]
    assert m["suspicion"] == pytest.approx(top["suspicion"], abs=1e-6)
    assert m["n_tiles"] == int(np.sum(tile_object == top["object"])) and m["area_um2"] > 0
    # heatmap: object suspicion on the thumbnail grid, highest at the top object's centre
    heat = np.load(result.paths["heatmap_npy"])
    grid = obj["heatmap_grid"]
    assert list(heat.shape) == grid["shape"]
    step = grid["stride"][0]
    assert step >= float(group["thumbnail"].attrs["downsample"])
    assert heat.shape[1] * step >= group["thumbnail"].shape[1] * float(group["thumbnail"].attrs["downsample"])
    cx, cy = objects.centre[top["object"]]
    assert heat[int(cy / step), int(cx / step)] == pytest.approx(per_object.max(), abs=1e-5)
    assert np.isnan(heat).mean() > 0.3  # nothing painted far from the objects
    assert Image.open(result.paths["gallery"]).size[0] > 0


def test_demo_student_score_is_calibrated_and_a_checkpoint_may_carry_its_own():
    import math

    from wsi_pipeline.scoring import read_checkpoint_info
    from wsi_pipeline.aggregation import calibrated, calibration_for

    info = read_checkpoint_info(None)
    demo, meta = info.sha256, info.metadata  # the demo student carries its calibration in its metadata
    cells = calibration_for(demo, meta, "cells", "topk_mean", 3)
    grid = calibration_for(demo, meta, "grid", "topk_mean", 3)
    assert cells and grid
    # 0.5 is the decision point: the raw score where the logistic crosses it maps to 0.5, monotone around it
    mid = -cells["intercept"] / cells["slope"]
    assert calibrated(mid, cells) == pytest.approx(0.5)
    assert calibrated(mid - 0.05, cells) < 0.5 < calibrated(mid + 0.05, cells)
    # a calibration applies only to the statistic it was fitted on
    assert calibration_for(demo, meta, "cells", "topk_mean", 5) is None
    assert calibration_for(demo, meta, "cells", "quantile", 3) is None
    assert calibration_for("0" * 64, {}, "cells", "topk_mean", 3) is None
    own = {"calibration": json.dumps({"grid": {"slope": 2.0, "intercept": -1.0, "method": "topk_mean", "top_k": 3}})}
    entry = calibration_for("0" * 64, own, "grid", "topk_mean", 3)
    assert calibrated(0.25, entry) == pytest.approx(1 / (1 + math.exp(0.5)))


def test_cells_summary_reports_the_calibrated_score(cells_scored, tmp_path):
    from wsi_pipeline.aggregation import calibrated

    summary = aggregate_store(cells_scored["store"], tmp_path / "agg").summary
    score = summary["score"]
    assert score["calibration"] is not None  # the demo student's fit for the cells placement
    assert score["value"] == pytest.approx(calibrated(score["raw"], score["calibration"]), abs=1e-4)  # raw is rounded


def _real_field_picture(shared_data, reps: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A real smear field (BCCD) repeated into a larger picture, and its stained-pixel mask."""
    with Image.open(shared_data / "smear_fields" / "BloodImage_00000.jpg") as im:
        field = np.asarray(im.convert("RGB"))
    thumb = np.ascontiguousarray(np.tile(field, (reps[0], reps[1], 1)))
    return thumb, thumb.mean(axis=-1) < 190


def test_overlay_image_in_bands_equals_the_whole_array(shared_data):
    thumb, mask = _real_field_picture(shared_data, (2, 2))
    h, w = thumb.shape[:2]
    heat = np.random.default_rng(5).random((9, 11)).astype(np.float32)
    heat[2, 3] = np.nan
    grid = {"stride": [w / 11, h / 9], "origin": [0, 0]}
    whole = overlay_image(thumb, mask, heat, grid, 1.0, 0.6, band_rows=h)
    assert mask_outline(mask).sum() > 1000 and (whole != thumb).any(axis=-1).mean() > 0.3  # something to compare
    for rows in (1, 7, 128, h - 1):
        np.testing.assert_array_equal(overlay_image(thumb, mask, heat, grid, 1.0, 0.6, band_rows=rows), whole)


def test_overlay_picture_from_zarr_bands_equals_the_whole_numpy_picture(shared_data, tmp_path):
    """overlay.png made from the store's zarr arrays band by band, one channel at a time, is pixel for
    pixel the picture of the whole arrays resized as one RGB image (reduced and enlarged)."""
    import zarr

    from wsi_pipeline.aggregation.outputs import _picture_with_colourbar, overlay_picture, overlay_scale

    for reps in ((5, 4), (1, 1)):  # 2400 x 2560 px: reduced (as a 60k-px slide's); 480 x 640 px: enlarged
        thumb, mask = _real_field_picture(shared_data, reps)
        h, w = thumb.shape[:2]
        heat = np.random.default_rng(1).random((6, 7)).astype(np.float32)
        grid = {"stride": [w / 7, h / 6]}
        z_thumb = zarr.create_array(tmp_path / f"t{reps}.zarr", shape=thumb.shape, chunks=(100, 300, 3), dtype="uint8")
        z_thumb[:] = thumb
        z_mask = zarr.create_array(tmp_path / f"m{reps}.zarr", shape=mask.shape, chunks=(100, 300), dtype="bool")
        z_mask[:] = mask
        png = overlay_picture(z_thumb, z_mask, heat, grid, 2.0, 0.6, "slide")
        scale = overlay_scale(thumb.shape)
        size = (round(w * scale), round(h * scale))
        small = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.LANCZOS))
        small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)) > 127
        expected = _picture_with_colourbar(overlay_image(small, small_mask, heat, grid, 2.0 / scale, 0.6), "slide",
                                           "tile suspicion (0-1)", "tile opacity grows with suspicion; tiles below 0.2 "
                                           "not drawn; dark line: tissue mask")
        with Image.open(io.BytesIO(png)) as got, Image.open(io.BytesIO(expected)) as want:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert png == overlay_picture(thumb, mask, heat, grid, 2.0, 0.6, "slide")  # numpy arrays alike


def test_heatmap_colours_in_bands_equal_the_whole_map():
    from wsi_pipeline.aggregation.outputs import heatmap_rgba

    heat = np.random.default_rng(2).random((300, 41)).astype(np.float32) * 1.2 - 0.1  # also outside 0..1
    heat[::7, ::5] = np.nan
    whole = heatmap_rgba(heat, band_rows=300)
    assert (whole[..., 3] == 0).sum() == np.isnan(heat).sum() and len(np.unique(whole[..., 0])) > 50
    for rows in (1, 13, 256):
        np.testing.assert_array_equal(heatmap_rgba(heat, band_rows=rows), whole)
