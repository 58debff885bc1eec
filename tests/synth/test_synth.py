"""Synthetic cohort: file layout, OpenSlide compatibility, determinism, lesion geometry and look, errors."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw

from wsi_vssm.cli import main
from wsi_vssm.synth import SynthError, make_cohort, write_slide
from wsi_vssm.synth.cohort import cohort_plan, slide_seed
from wsi_vssm.synth.layout import make_layout
from wsi_vssm.synth.tissue import tissue_field
from wsi_vssm.synth.writer import level_sizes

openslide = pytest.importorskip("openslide")

SIZE, MPP, SEED = 2048, 0.5, 5


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["synth", *map(str, args)])
    return exc.value.code


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    assert run_cli(out, "--slides", 3, "--seed", SEED, "--size", SIZE, "--mpp", MPP, "--workers", 2) == 0
    return out


def read_polygons(xml_path) -> list[np.ndarray]:
    root = ET.parse(xml_path).getroot()
    return [
        np.array([[float(c.get("X")), float(c.get("Y"))] for c in ann.iter("Coordinate")])
        for ann in root.iter("Annotation")
    ]


def lesion_mask(polygons, size: int) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for p in polygons:
        draw.polygon([tuple(v) for v in p], fill=1)
    return np.asarray(img, bool)


def test_cohort_files_and_reference_csv(cohort):
    names = sorted(p.name for p in cohort.iterdir())
    assert names == ["annotations", "normal_001.tif", "normal_002.tif", "reference.csv", "tumor_001.tif"]
    assert (
        cohort / "reference.csv"
    ).read_text() == "slide,label\nnormal_001,normal\nnormal_002,normal\ntumor_001,tumor\n"
    assert sorted(p.name for p in (cohort / "annotations").iterdir()) == ["tumor_001.xml"]


@pytest.mark.parametrize("n, n_tumor", [(1, 0), (2, 1), (3, 1), (4, 2), (7, 3)])
def test_half_tumour_rounded_down(n, n_tumor):
    plan = cohort_plan(n)
    assert len(plan) == n and sum(label == "tumor" for _, label in plan) == n_tumor
    assert len({name for name, _ in plan}) == n


def test_openslide_reads_levels_and_mpp(cohort):
    import tifffile

    expected = level_sizes(SIZE, SIZE)
    assert len(expected) >= 2 and max(expected[-1]) <= 1000
    for path in sorted(cohort.glob("*.tif")):
        assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
        with openslide.OpenSlide(str(path)) as s:
            assert s.level_dimensions == tuple(expected)
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(MPP)
            via_openslide = np.asarray(s.read_region((256, 512), 0, (256, 256)).convert("RGB"))
        with tifffile.TiffFile(path) as tf:
            assert len(tf.pages) == len(expected) and not tf.pages[0].subifds
            for level, page in enumerate(tf.pages):
                assert page.tile == (256, 256) and page.compression == tifffile.COMPRESSION.JPEG
                assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
                assert int(page.subfiletype) == (1 if level else 0)
                assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
                assert page.resolution[0] == pytest.approx(1e4 / (MPP * SIZE / page.shape[1]))
            via_tifffile = tf.pages[0].asarray()[512:768, 256:512]
        # OpenSlide's decoder and libjpeg via tifffile may round differently by a grey level or two
        assert np.abs(via_openslide.astype(int) - via_tifffile).mean() < 2


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"
    write_slide(a, 1536, MPP, 42, True, workers=1)
    write_slide(b, 1536, MPP, 42, True, workers=3)  # thread count and tile order must not matter
    write_slide(c, 1536, MPP, 43, True, workers=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temporaries cleaned up


def test_cohort_seeds_differ_between_slides():
    seeds = {slide_seed(1, label, i) for label in ("normal", "tumor") for i in range(1, 6)}
    assert len(seeds) == 10


def test_asap_xml_structure(cohort):
    root = ET.parse(cohort / "annotations" / "tumor_001.xml").getroot()
    assert root.tag == "ASAP_Annotations"
    anns = root.findall("./Annotations/Annotation")
    assert 1 <= len(anns) <= 3
    for i, ann in enumerate(anns):
        assert ann.attrib == {
            "Name": f"Annotation {i}",
            "Type": "Polygon",
            "PartOfGroup": "_0",
            "Color": "#F4FA58",
        }
        coords = ann.findall("./Coordinates/Coordinate")
        assert len(coords) >= 16
        assert [int(c.get("Order")) for c in coords] == list(range(len(coords)))
    group = root.find("./AnnotationGroups/Group")
    assert group.attrib == {"Name": "_0", "PartOfGroup": "None", "Color": "#FF0000"}
    assert group.find("Attributes") is not None


def test_lesions_inside_image_and_tissue(cohort):
    polygons = read_polygons(cohort / "annotations" / "tumor_001.xml")
    layout = make_layout(SIZE, MPP, slide_seed(SEED, "tumor", 1), True)
    for poly, expected in zip(polygons, layout.lesion_polygons(), strict=True):
        np.testing.assert_allclose(poly, expected, atol=0.01)
        assert (poly >= 0).all() and (poly < SIZE).all()
        assert (tissue_field(layout, poly[:, 0], poly[:, 1]) > 0).all()
    # and in the pixels: no background inside lesions
    with openslide.OpenSlide(str(cohort / "tumor_001.tif")) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB"))
    inside = rgb[lesion_mask(polygons, SIZE)]
    assert inside.size and (inside.min(axis=1) > 215).mean() < 0.02


def test_layouts_put_lesions_in_tissue_for_many_seeds():
    for seed in range(12):
        layout = make_layout(4096, MPP, seed, True)
        assert 1 <= len(layout.lesions) <= 3
        for poly in layout.lesion_polygons():
            assert (tissue_field(layout, poly[:, 0], poly[:, 1]) > 0).all()


def _dark_fraction(rgb: np.ndarray) -> float:
    """Share of haematoxylin-like pixels (dark, blue above red): nuclei."""
    r, g, b = (rgb[:, c].astype(int) for c in range(3))
    return float(((r + g + b < 360) & (b > r)).mean())


def test_tumour_is_darker_and_denser_than_normal_tissue(cohort):
    polygons = read_polygons(cohort / "annotations" / "tumor_001.xml")
    with openslide.OpenSlide(str(cohort / "tumor_001.tif")) as s:
        tumour = np.asarray(s.read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB"))[lesion_mask(polygons, SIZE)]
    normal_pixels = []
    for name in ("normal_001", "normal_002"):
        with openslide.OpenSlide(str(cohort / f"{name}.tif")) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, (SIZE, SIZE)).convert("RGB")).reshape(-1, 3)
        normal_pixels.append(rgb[rgb.min(1) < 200])  # tissue (stroma, fat rims, nuclei), not background
    normal = np.concatenate(normal_pixels)
    assert tumour.mean() < normal.mean() - 25
    assert _dark_fraction(tumour) > 2 * _dark_fraction(normal)


def test_library_api_returns_polygons(tmp_path):
    records = make_cohort(tmp_path / "c", 1, seed=3, size=1024, workers=1)
    assert [(r.name, r.label, r.lesions) for r in records] == [("normal_001", "normal", [])]
    assert (tmp_path / "c" / "reference.csv").read_text() == "slide,label\nnormal_001,normal\n"


@pytest.mark.parametrize(
    "args, option",
    [
        (["--slides", 0], "--slides"),
        (["--slides", 2, "--size", 100], "--size"),
        (["--slides", 2, "--mpp", -1], "--mpp"),
        (["--slides", 2, "--workers", 0], "--workers"),
        ([], "--slides N or --patients N"),
        (["--slides", 2, "--patients", 1], "--slides N or --patients N"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, capsys, args, option):
    """Bad option values are usage errors: exit 2 and click's message naming the option."""
    assert run_cli(tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


def test_library_rejects_bad_values_in_one_line(tmp_path):
    with pytest.raises(SynthError, match="number of slides must be at least 1"):
        make_cohort(tmp_path / "a", 0)
    with pytest.raises(SynthError, match="slide size must be"):
        make_cohort(tmp_path / "b", 1, size=100)


def test_unwritable_output_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):  # root ignores permission bits, so block with a file instead
        assert run_cli(out, "--slides", 1, "--size", 1024) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("wsi-vssm: error:") and str(blocker) in err and "\n" not in err
    with pytest.raises(SynthError):
        make_cohort(blocker, 1, size=1024)


def test_every_pyramid_level_matches_level_zero_to_the_last_row(tmp_path):
    """The reduced levels are box-filtered level 0 down to their last tile row (it was left white once)."""
    from wsi_vssm.synth.writer import DOWNSAMPLE, write_pyramid

    rng = np.random.default_rng(0)
    size = (1300, 1300)  # 6 x 6 tiles at level 0; level 1 (325 px) has a partial last tile row
    base = rng.integers(0, 200, (size[1], size[0], 3), dtype=np.uint8)

    def render(x0, y0):
        tile = np.full((256, 256, 3), 255, np.uint8)
        part = base[y0:y0 + 256, x0:x0 + 256]
        tile[: part.shape[0], : part.shape[1]] = part
        return tile

    path = tmp_path / "p.tif"
    sizes = write_pyramid(path, size, render, 1.0, workers=1, quality=95)

    with tifffile.TiffFile(path) as tf:
        level1 = tf.pages[1].asarray()
    assert len(sizes) >= 2 and level1.shape[:2] == (sizes[1][1], sizes[1][0])
    bottom = level1[-DOWNSAMPLE * 2 :]  # the slide's own pixels (mean ~100), not white (255)
    assert bottom.mean() < 150, "the last rows of level 1 are white, not the downsampled slide"


def test_numba_caches_in_a_private_temp_folder_when_install_and_home_are_read_only(tmp_path):
    """On a read-only install with a read-only home, `synth` died with a 46-line traceback: numba's cache=True
    raised "cannot cache function '_clamp01': no locator available" at import. (Root can write anywhere, so the
    test stands in a write test that says no to every folder.)"""
    import os
    import subprocess
    import sys

    code = ("import wsi_vssm_kernels as k; k._writable = lambda folder: False\n"
            "from wsi_vssm.synth.tissue import _clamp01\n"
            "import numba; print(numba.config.CACHE_DIR); print(_clamp01(2.5))\n")
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    folder, value = res.stdout.split()
    assert folder == str(tmp_path / f"wsi-vssm-numba-cache-{os.getuid()}") and float(value) == 1.0
    assert any(p.suffix in (".nbi", ".nbc") for p in (tmp_path).rglob("*")), "nothing cached there"


def test_numba_keeps_its_own_cache_folder_when_one_is_writable(tmp_path, monkeypatch):
    import numba
    import wsi_vssm_kernels

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    source = tmp_path / "kernel.py"
    beside = str(tmp_path / "__pycache__")  # where numba writes a module's cache
    assert wsi_vssm_kernels.use_writable_numba_cache(str(source), writable=lambda f: f == beside) is None
    assert numba.config.CACHE_DIR == ""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice is never overridden
    assert wsi_vssm_kernels.use_writable_numba_cache(str(source), writable=lambda f: False) is None


def test_matplotlib_gets_a_private_config_folder_under_a_read_only_home(tmp_path, monkeypatch):
    """With HOME unwritable, matplotlib made a new temporary folder on every run, rebuilt its font list there and
    printed a two-line note without the wsi-vssm prefix."""
    import subprocess
    import sys

    import wsi_vssm_kernels

    # set, then deleted: monkeypatch then restores the variable's state from before the test, whatever the code
    # sets (a delenv of an absent variable records nothing, and the folder leaked into every later test)
    monkeypatch.setenv("MPLCONFIGDIR", "unset-by-the-test")
    monkeypatch.delenv("MPLCONFIGDIR")
    monkeypatch.setattr(wsi_vssm_kernels.tempfile, "tempdir", str(tmp_path))
    folder = wsi_vssm_kernels.use_writable_matplotlib_config(writable=lambda f: False)
    assert folder and os.environ["MPLCONFIGDIR"] == folder and folder.startswith(str(tmp_path))
    assert wsi_vssm_kernels.use_writable_matplotlib_config(writable=lambda f: False) is None  # set: kept
    monkeypatch.delenv("MPLCONFIGDIR")
    assert wsi_vssm_kernels.use_writable_matplotlib_config(writable=lambda f: True) is None
    assert "MPLCONFIGDIR" not in os.environ
    # a home no one can write into (a file: even root cannot make folders in it), in a fresh process as the
    # command line starts; without the call matplotlib's own note comes, with it none, and the folder is kept
    home = tmp_path / "home"
    home.write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    probe = "import matplotlib; from matplotlib import font_manager; print(matplotlib.get_cachedir())"
    call = "import wsi_vssm_kernels; wsi_vssm_kernels.use_writable_matplotlib_config(); "
    for pre, noted in (("", True), (call, False), (call, False)):
        done = subprocess.run([sys.executable, "-c", pre + probe], env=env, capture_output=True, text=True,
                              check=True)
        assert ("Matplotlib created a temporary" in done.stderr) == noted, done.stderr
    assert done.stdout.strip() == str(tmp_path / "tmp" / f"wsi-vssm-matplotlib-{os.getuid()}")


def test_synth_into_another_cohorts_folder_is_refused(tmp_path, capsys):
    """`synth syn --slides 1` over a 2-slide cohort overwrote reference.csv and left tumor_001.tif and its XML
    beside the new slide, so `predict syn` still took them."""
    (tmp_path / "reference.csv").write_text("slide,label\ntumor_001,tumor\nnormal_001,normal\nnormal_002,normal\n")
    assert run_cli(tmp_path, "--slides", 1, "--size", 1024) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already holds other slides (normal_002, tumor_001)" in err, err
    assert not (tmp_path / "normal_001.tif").exists()  # refused before writing anything
    (tmp_path / "reference.csv").write_text("slide,label\nnormal_001,normal\n")  # the same cohort again: fine
    assert run_cli(tmp_path, "--slides", 1, "--size", 1024) == 0
    assert (tmp_path / "normal_001.tif").is_file()


@pytest.mark.parametrize("table", ["name,label\nnormal_001,0\n", "\ufeffslide,label\nnormal_001,normal\n",
                                   "slide,label\nnormal_001.tif,0\n", "Slide,Label\nNormal_001,Normal\n",
                                   '"slide","label"\n"normal_001","0"\n'])
def test_synth_takes_the_same_cohort_however_its_table_was_written(tmp_path, table):
    """A hand-written reference.csv naming the same slide was refused as "another cohort" for its header, BOM,
    extensions, case or quoting: it was split on commas, not read as evaluate reads it."""
    (tmp_path / "reference.csv").write_text(table, encoding="utf-8")
    from wsi_vssm.synth.cohort import refuse_another_cohort

    assert refuse_another_cohort(tmp_path, ["normal_001"]) is None  # the same slide: taken
    with pytest.raises(SynthError, match=r"(?i)already holds other slides \(normal_001\)"):
        refuse_another_cohort(tmp_path, ["tumor_001"])  # the table was read: another cohort is still refused


def test_synth_into_a_folder_of_other_slides_is_refused(tmp_path):
    """Without a reference.csv, a folder holding another slide took the new cohort beside it."""
    from wsi_vssm.synth.cohort import refuse_another_cohort

    (tmp_path / "real_slide.tif").write_bytes(b"x")
    with pytest.raises(SynthError, match=r"already holds other slides \(real_slide\)"):
        refuse_another_cohort(tmp_path, ["normal_001"])


@pytest.mark.parametrize("planted", ["shared", "link"])
def test_numba_never_caches_in_a_folder_another_user_could_have_planted(tmp_path, monkeypatch, planted):
    """Review: the fallback folder's name is predictable and numba unpickles what it finds there; a folder others
    can write (or a link) is passed over for a fresh private one."""
    import os
    import tempfile

    import wsi_vssm_kernels

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"wsi-vssm-numba-cache-{os.getuid()}"
    assert wsi_vssm_kernels._private_folder() == str(folder)  # made private: kept between runs
    folder.rmdir()
    if planted == "shared":
        folder.mkdir()
        folder.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere")
    chosen = wsi_vssm_kernels._private_folder()
    assert chosen != str(folder) and os.path.isdir(chosen) and not os.stat(chosen).st_mode & 0o077
