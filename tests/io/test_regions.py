"""RegionGrid and RegionStream over in-memory slides."""

from __future__ import annotations

import _thread
import signal
import threading
import time
import warnings

import numpy as np
import pytest

from wsi_vssm.errors import UsageError
from wsi_vssm.io import ArraySlide, MissingMpp, SlideReadError
from wsi_vssm.io.regions import NoTissueWarning, Region, RegionGrid, RegionStream, read_region


def _slide(h: int = 300, w: int = 410, mpp: float | None = 0.5, seed: int = 0) -> ArraySlide:
    rng = np.random.default_rng(seed)
    return ArraySlide(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mpp=mpp, min_side=64)


def _full_tissue(slide) -> np.ndarray:
    w, h = slide.dimensions
    return np.ones((h, w), bool)


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wsi-vssm-region")]


def _wait_no_threads(timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while _stream_threads() and time.monotonic() < end:
        time.sleep(0.01)
    return not _stream_threads()


class CountingSlide(ArraySlide):
    """Counts reads in flight or done; optionally slow, or failing at one region."""

    def __init__(self, *a, delay: float = 0.0, fail_at_x: int | None = None, **kw):
        super().__init__(*a, **kw)
        self.delay, self.fail_at_x = delay, fail_at_x
        self.started = 0
        self.lock = threading.Lock()

    def read(self, x, y, w, h, mpp):
        with self.lock:
            self.started += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at_x is not None and x == self.fail_at_x:
            raise SlideReadError("fake.svs", f"bogus marker at x={x}")
        return super().read(x, y, w, h, mpp)


# ---- grid --------------------------------------------------------------------------------------------------
def test_grid_geometry_at_coarser_mpp():
    slide = _slide()  # 410 x 300 at 0.5 um/px
    grid = RegionGrid(slide, mpp=1.0, region_px=64, tissue=_full_tissue(slide))
    side = 128  # 64 px at 1.0 um/px = 128 level-0 px at 0.5
    assert grid.shape == (3, 4)
    assert len(grid) == 12
    assert [r.index for r in grid] == list(range(12))
    assert {(r.w, r.h, r.size) for r in grid} == {(side, side, 64)}
    assert sorted({r.x for r in grid}) == [0, 128, 256, 384]
    last = grid[len(grid) - 1]
    assert (last.x, last.y) == (384, 256)
    # 410 - 384 = 26 level-0 px = 13 output px valid; 300 - 256 = 44 -> 22.
    assert last.valid == (0, 0, 13, 22)
    assert grid[0].valid == (0, 0, 64, 64)
    m = last.valid_mask()
    assert m.sum() == 13 * 22 and m[:22, :13].all()


def test_grid_valid_box_leaves_out_a_partly_padded_pixel():
    slide = _slide(h=301, w=411)  # 27 and 45 level-0 px past the last region's corner: 13.5 and 22.5 output px
    grid = RegionGrid(slide, mpp=1.0, region_px=64, tissue=_full_tissue(slide))
    assert grid[len(grid) - 1].valid == (0, 0, 13, 22)  # the half-padded 14th column and 23rd row are not valid


def test_grid_overlap_and_whole_coverage():
    slide = _slide()
    grid = RegionGrid(slide, mpp=0.5, region_px=100, overlap_px=30, tissue=_full_tissue(slide))
    xs = sorted({r.x for r in grid})
    assert xs == [0, 70, 140, 210, 280, 350]  # step 70; the last reaches past 410
    assert xs[-1] + 100 >= 410 and xs[-2] + 100 < 410
    with pytest.raises(UsageError, match="overlap_px"):
        RegionGrid(slide, mpp=0.5, region_px=100, overlap_px=100, tissue=_full_tissue(slide))


def test_grid_min_tissue_filters():
    slide = _slide(h=200, w=200)
    mask = np.zeros((200, 200), bool)
    mask[:100, :100] = True  # top-left region full
    mask[100:110, 100:200] = True  # bottom-right region 10% tissue
    grid = RegionGrid(slide, mpp=0.5, region_px=100, tissue=mask)
    assert [(r.row, r.col) for r in grid] == [(0, 0), (1, 1)]
    assert grid[0].tissue == pytest.approx(1.0) and grid[1].tissue == pytest.approx(0.1)
    strict = RegionGrid(slide, mpp=0.5, region_px=100, tissue=mask, min_tissue=0.5)
    assert [(r.row, r.col) for r in strict] == [(0, 0)]


def test_grid_uses_coarse_mask_with_scale():
    slide = _slide(h=200, w=200)
    coarse = np.zeros((20, 20), bool)
    coarse[:10, :10] = True
    grid = RegionGrid(slide, mpp=0.5, region_px=100, tissue=(coarse, 10.0))
    assert [(r.row, r.col) for r in grid] == [(0, 0)]


def test_grid_computes_tissue_from_thumbnail():
    img = np.full((400, 400, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    stain = np.array([200, 120, 180]) + rng.normal(0, 18, (150, 150, 1))
    img[220:370, 220:370] = np.clip(stain, 0, 255).astype(np.uint8)
    grid = RegionGrid(ArraySlide(img, mpp=0.5, min_side=64), mpp=0.5, region_px=200)
    assert [(r.row, r.col) for r in grid] == [(1, 1)]


def test_grid_without_tissue_warns_and_is_empty():
    slide = ArraySlide(np.full((256, 256, 3), 240, np.uint8), mpp=0.5)
    with pytest.warns(NoTissueWarning, match="no tissue found"):
        grid = RegionGrid(slide, mpp=0.5, region_px=64)
    assert len(grid) == 0
    with RegionStream(slide, grid) as stream:
        assert list(stream) == []


def test_grid_needs_mpp():
    slide = _slide(mpp=None)
    with pytest.raises(MissingMpp, match="--mpp"):
        RegionGrid(slide, mpp=1.0, region_px=64)


def test_read_region_is_exact_size_with_white_padding():
    slide = _slide()
    grid = RegionGrid(slide, mpp=1.0, region_px=64, tissue=_full_tissue(slide))
    last = grid[len(grid) - 1]
    img = read_region(slide, last, 1.0)
    assert img.shape == (64, 64, 3)
    x0, y0, x1, y1 = last.valid
    assert (img[y1 + 1 :] == 255).all() and (img[:, x1 + 1 :] == 255).all()


# ---- stream ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
def test_stream_keeps_order_and_pixels(workers):
    slide = _slide()
    grid = RegionGrid(slide, mpp=1.0, region_px=48, overlap_px=8, tissue=_full_tissue(slide))
    seen = []
    with RegionStream(slide, grid, workers=workers, prefetch=4) as stream:
        for region, img in stream:
            seen.append(region.index)
            np.testing.assert_array_equal(img, read_region(slide, region, 1.0))
    assert seen == list(range(len(grid)))
    assert _wait_no_threads()


def test_stream_per_thread_factory_opens_one_reader_per_worker():
    base = _slide()
    opened: list[tuple[int, ArraySlide]] = []

    def factory():
        s = ArraySlide(levels=[base._levels[0]], mpp=0.5)
        opened.append((threading.get_ident(), s))
        return s

    grid = RegionGrid(base, mpp=0.5, region_px=64, tissue=_full_tissue(base))
    with RegionStream(factory, grid, workers=2) as stream:
        out = [(r.index, img.sum()) for r, img in stream]
    assert [i for i, _ in out] == list(range(len(grid)))
    assert 1 <= len(opened) <= 2
    assert len({tid for tid, _ in opened}) == len(opened)  # never two readers in one thread


def test_stream_memory_is_bounded():
    slide = CountingSlide(_slide()._levels[0], mpp=0.5, min_side=64, delay=0.002)
    grid = RegionGrid(slide, mpp=0.5, region_px=32, tissue=_full_tissue(slide))
    assert len(grid) > 40
    prefetch, worst = 3, 0
    with RegionStream(slide, grid, workers=2, prefetch=prefetch) as stream:
        for consumed, _ in enumerate(stream, start=1):
            time.sleep(0.003)  # a consumer slower than the readers: the bound is what holds them back
            with slide.lock:
                worst = max(worst, slide.started - consumed)
    # Reads started but not yet handed over never exceed the bound.
    assert worst <= prefetch
    assert worst >= 1  # and reading did run ahead


def test_worker_error_propagates_with_its_type_and_threads_end():
    slide = CountingSlide(_slide()._levels[0], mpp=0.5, min_side=64, fail_at_x=192)
    grid = RegionGrid(slide, mpp=0.5, region_px=64, tissue=_full_tissue(slide))
    got = []
    stream = RegionStream(slide, grid, workers=2, prefetch=2)
    with pytest.raises(SlideReadError, match="bogus marker at x=192"):
        for region, _ in stream:
            got.append(region.x)
    assert got == [0, 64, 128]  # everything before the broken region arrived, in order
    assert _wait_no_threads()
    assert list(stream) == []  # a failed stream stays closed


def test_early_break_shuts_down():
    slide = CountingSlide(_slide()._levels[0], mpp=0.5, min_side=64, delay=0.005)
    grid = RegionGrid(slide, mpp=0.5, region_px=32, tissue=_full_tissue(slide))
    with RegionStream(slide, grid, workers=2, prefetch=4) as stream:
        for i, _ in enumerate(stream):
            if i == 2:
                break
    assert _wait_no_threads()
    assert slide.started <= 3 + 4 + 1  # queued reads were cancelled, not run to the end of the grid
    assert slide.started < len(grid)


def test_dropped_stream_after_break_cleans_up():
    slide = CountingSlide(_slide()._levels[0], mpp=0.5, min_side=64, delay=0.002)
    grid = RegionGrid(slide, mpp=0.5, region_px=32, tissue=_full_tissue(slide))
    for i, _ in enumerate(RegionStream(slide, grid, workers=2)):
        if i == 1:
            break
    assert _wait_no_threads()
    assert slide.started < len(grid)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test: interrupt_main() does nothing while SIGINT is ignored or left to
    the OS, which an earlier test's library (a Dask cluster, Qt) may have set and not restored yet."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_keyboard_interrupt_in_consumer_stops_threads(python_sigint):
    slide = CountingSlide(_slide()._levels[0], mpp=0.5, min_side=64, delay=0.05)
    grid = RegionGrid(slide, mpp=0.5, region_px=32, tissue=_full_tissue(slide))
    # Ctrl-C lands where the consumer spends its time: in its own work (as extract_regions' backbone), with the
    # stream open in a `with` block, or while it waits in __next__ for a read
    with pytest.raises(KeyboardInterrupt), RegionStream(slide, grid, workers=2, prefetch=2) as stream:
        for i, _ in enumerate(stream):
            if i == 1:
                _thread.interrupt_main()
    assert _wait_no_threads()
    assert slide.started < len(grid)

    class InterruptingSlide(CountingSlide):
        fired = False

        def read(self, *a):  # the 4th read asks for Ctrl-C while the consumer waits in __next__
            with self.lock:
                fire, self.fired = self.started == 3 and not self.fired, self.fired or self.started == 3
            if fire:
                _thread.interrupt_main()
            return super().read(*a)

    slide = InterruptingSlide(_slide()._levels[0], mpp=0.5, min_side=64, delay=0.05)
    with pytest.raises(KeyboardInterrupt):
        for _ in RegionStream(slide, grid, workers=2, prefetch=2):
            pass
    assert _wait_no_threads()
    assert slide.started < len(grid)


def test_stream_validates_arguments():
    slide = _slide()
    region = Region(0, 0, 0, 0, 0, 10, 10, 10, 1.0, (0, 0, 10, 10))
    with pytest.raises(UsageError, match="needs `mpp`"):
        RegionStream(slide, [region])
    with pytest.raises(UsageError, match="workers"):
        RegionStream(slide, [region], mpp=0.5, workers=0)
    with pytest.raises(UsageError, match="source"):
        RegionStream(42, [region], mpp=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RegionStream(slide, [region], mpp=0.5, workers=1) as stream:
            (got,) = list(stream)
    assert got[1].shape == (10, 10, 3)
