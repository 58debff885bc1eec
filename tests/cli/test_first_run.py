"""What a new user sees first: one tissue mask everywhere, honest one-line errors, usage errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA

from wsi_vssm.cli import main
from wsi_vssm.io import open_slide
from wsi_vssm.io.tissue import slide_tissue
from wsi_vssm.outputs.heatmap import read_heatmap_zarr
from wsi_vssm.pipeline.geometry import DEFAULT_MIN_TISSUE, cell_tissue_map
from wsi_vssm.pipeline.predict import PredictParams, predict_slide

FAST = PredictParams(device="cpu", reader_threads=1)
SAMPLE = REPO / "sample_data" / "cmu-1-small-region.svs"


def _cli(args) -> tuple[int, list[str]]:
    """Run the CLI in a fresh interpreter: (exit code, stderr lines)."""
    proc = subprocess.run([sys.executable, "-m", "wsi_vssm", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("which", ["synthetic", "cmu1"])
def test_every_tissue_cell_info_counts_gets_a_probability(which, cohort, model_file, tmp_path):
    """predict and info share one mask: no tissue cell (lymphoid-dense ones included) is left without a score."""
    from wsi_vssm.commands.info import slide_info
    from wsi_vssm.models.slide_model import load_model

    path = cohort / "tumor_001.tif" if which == "synthetic" else SAMPLE
    with open_slide(path) as slide:
        tissue = slide_tissue(slide)
        dims = slide.dimensions
    assert slide_info(str(path))["tissue_fraction"] == pytest.approx(tissue.fraction, abs=1e-4)
    rec = predict_slide(path, load_model(model_file), tmp_path, FAST)
    prob, _, _, attrs = read_heatmap_zarr(tmp_path / rec["slide"] / "heatmap.ome.zarr")
    cell0 = float(attrs["wsi_vssm"]["cell0"])
    whole = (int(dims[1] // cell0), int(dims[0] // cell0))  # cells wholly inside the slide get scored
    fraction = cell_tissue_map(tissue.mask, tissue.scale, cell0, whole)
    counted = (fraction >= DEFAULT_MIN_TISSUE) & (fraction > 0)
    assert counted.sum() > 20
    scored = prob[: whole[0], : whole[1]] > 0  # the heatmap stores 0 where no cell was scored
    assert scored[counted].all(), f"{int((~scored[counted]).sum())} of {int(counted.sum())} tissue cells unscored"
    assert rec["summary"]["n_cells"] == int(scored.sum())


def test_tissue_mask_keeps_real_lymph_node_tissue(tmp_path):
    """Mosaics of real PCam patches (lymph node, both labels): at least 99% of the tokens on stained tissue are
    kept as tissue. A token is on tissue when most of its pixels carry stain (chroma >= 0.07) at full resolution;
    the glass and fat inside PCam patches (white, about half of their tokens) is not tissue by any rule."""
    tar = SHARED_DATA / "pcam" / "valid.tar"
    if not tar.exists():
        pytest.skip(f"shared data not present: {tar}")
    from wsi_vssm.synth.mosaic import make_mosaic_cohort
    from wsi_vssm.training.data.patches import load_patches

    patches = load_patches(tar).subset(np.arange(0, 3000, 10))  # 300 patches, both labels
    make_mosaic_cohort(tmp_path / "m", patches, 2, seed=3, grid=8, mpp=0.972)
    for slide_path in sorted((tmp_path / "m").glob("*.tif")):
        with open_slide(slide_path) as slide:
            tissue = slide_tissue(slide)
            w, h = slide.dimensions
            region = slide.read_region((0, 0), 0, (w, h)).astype(np.int16)
        t = 32  # the slide is written at the analysis mpp: one token is 32 px
        shape = (h // t, w // t)
        frac = cell_tissue_map(tissue.mask, tissue.scale, t, shape)
        px = region[: shape[0] * t, : shape[1] * t]
        stained = (px.max(axis=2) - px.min(axis=2)) >= 0.07 * 255
        on_tissue = stained.reshape(shape[0], t, shape[1], t).mean(axis=(1, 3)) >= 0.5
        assert on_tissue.sum() > 100
        kept = (frac >= DEFAULT_MIN_TISSUE)[on_tissue].mean()
        assert kept >= 0.99, f"{slide_path.name}: {kept:.3f} of tissue tokens kept"


def test_garbage_model_file_is_one_line_without_an_unsafe_hint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    code, err = _cli(["predict", SAMPLE, "--model", bad, "--out", tmp_path / "out"])
    assert code == 1 and len(err) == 1, err
    assert "not a wsi-vssm model file (" in err[0] and str(bad) in err[0]
    assert "weights_only" not in err[0] and len(err[0]) < 300


def test_pickled_object_model_file_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "obj.pt"
    torch.save({"weights": torch.zeros(2), "opt": {"lr": 1e-3}}, bad)
    code, err = _cli(["predict", SAMPLE, "--model", bad, "--out", tmp_path / "out"])
    assert code == 1 and len(err) == 1 and "not a wsi-vssm model file" in err[0], err


def test_truncated_svs_says_so_in_one_line(tmp_path):
    cut = tmp_path / "cut.svs"
    data = SAMPLE.read_bytes()
    cut.write_bytes(data[: len(data) // 4])
    for cmd in (["info", cut], ["predict", cut, "--out", tmp_path / "out"]):
        code, err = _cli(cmd)
        assert code == 1 and len(err) == 1, err  # no library log lines
        assert "truncated" in err[0] and str(cut) in err[0]


@pytest.mark.parametrize("args", [
    ["synth", "{out}", "--slides", "0"],
    ["synth", "{out}", "--slides", "2", "--quality", "101"],
    ["predict", str(SAMPLE), "--device", "tpu"],
    ["evaluate", "{out}", "--no-such-option"],
])
def test_usage_errors_exit_2(args, tmp_path, capsys):
    args = [a.format(out=tmp_path / "x") for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2


def test_no_tissue_slide_still_gets_a_clear_overlay(model_file, tmp_path):
    from PIL import Image

    from wsi_vssm.models.slide_model import load_model
    from wsi_vssm.synth.mosaic import write_image_slide

    blank = np.full((1024, 1024, 3), 250, np.uint8)
    write_image_slide(tmp_path / "blank.tif", blank, 1.0)
    rec = predict_slide(tmp_path / "blank.tif", load_model(model_file), tmp_path / "out", FAST)
    assert rec["probability"] is None and rec["reason"] == "no tissue found"
    png = Image.open(tmp_path / "out" / "blank" / "overlay.png")
    assert png.size[0] > 100 and png.size[1] > 100


def test_readme_demo_and_test_lines_are_true():
    readme = (REPO / "README.md").read_text()
    assert "pip install torch==2.13.0 -e \".[dev,napari]\"" in readme
    assert "OMP_NUM_THREADS=2 pytest -q -n 2" in readme
    demo = [line for line in readme.splitlines() if line.startswith("wsi-vssm predict sample_data/")]
    assert demo and all((REPO / line.split()[2]).exists() for line in demo)
    assert "lymph" in readme.lower()


def test_info_tells_what_a_model_file_is(model_file, tmp_path, capsys):
    """`wsi-vssm info m.pt` said "not a slide format this app reads": nothing showed a model file's resolution,
    thresholds, domain or identity before one predicted with it."""
    import json

    from conftest import run_cli_captured

    from wsi_vssm.models.slide_model import load_model, model_identity

    code, out, err = run_cli_captured(["info", model_file], capsys)
    assert code == 0 and "a wsi-vssm model file" in out and "um/px (slides are read there)" in out, err
    code, out, _ = run_cli_captured(["info", "--json", model_file], capsys)
    report = json.loads(out)
    model = load_model(model_file)
    assert (report["kind"], report["mpp"], report["token_px"]) == ("model", model.mpp, model.token_px)
    assert report["weights_hash"] == model_identity(model)["weights_hash"]
    assert report["patch_fingerprints"] is None  # a file without the record says nothing of it
    assert report["slide_head"] == {"pool": model.mil.config.pool, "members": 1, "size_term": False}
    assert f"slide head:  {model.mil.config.pool}\n" in run_cli_captured(["info", model_file], capsys)[1]
    # the default model remembers the distinct patch files that trained and selected it (PCam repeats some)
    code, out, _ = run_cli_captured(["info", "default"], capsys)
    assert code == 0 and "remembers:   19171 training and 987 selection patch files" in out
    (tmp_path / "junk.pt").write_bytes(b"junk")
    code, _, err = run_cli_captured(["info", tmp_path / "junk.pt"], capsys)
    assert code == 1 and "junk.pt" in err and err.count("\n") == 1
