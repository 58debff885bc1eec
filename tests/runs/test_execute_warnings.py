"""The warnings a slide's run records and prints."""

import warnings

from wsi_vssm.runs.execute import SlideTask, execute


class _WarningJob:
    out = "/nonexistent-out"

    def run(self, task, region_progress=None, run_regions=None):
        where = "/data/" + "a-long-folder-name-" * 12 + task.name  # a cohort's real paths are long
        warnings.warn(f"{where}: out of the model's domain, results are unreliable: no eosin: looks like IHC; "
                      "tissue unlike the training data: token feature distance 13.95 > threshold 11.66 (median "
                      "Mahalanobis distance)", stacklevel=1)
        warnings.warn(f"{where}: out of the model's domain, results are unreliable: no eosin: looks like IHC; "
                      "tissue unlike the training data: token feature distance 13.95 > threshold 11.66 (median "
                      "Mahalanobis distance)", stacklevel=1)  # once per open of the slide: said once
        return {"probability": 1.0, "timings": {}}


def test_a_slides_warning_keeps_its_reasons_after_a_long_path():
    """Slide runs cut their warnings at the errors' 300 characters: the kidney's "(median Mahalanobis..." lost
    the end of its domain note, though the terminal's warnings are cut at 1,000 since 2026-12-07."""
    res = execute(_WarningJob(), SlideTask("kidney", "/data/kidney.tif"))
    assert res["ok"] and len(res["warnings"]) == 1, res
    assert len(res["warnings"][0]) > 300 and res["warnings"][0].endswith("(median Mahalanobis distance)")
