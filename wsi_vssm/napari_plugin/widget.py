"""The Predict dock widget: pick a slide layer and a model, run prediction in the background, show the result.

Qt lives only here (napari imports this module when the widget is opened). The work itself is
`_predict.run_prediction`, run on a superqt worker thread; progress comes back through a Qt signal, Cancel
sets a threading.Event that prediction checks between regions, and every error becomes a notification. A run
is also cancelled when the widget leaves the viewer: napari's close button takes it out of its dock
(setParent(None), no close event), and closing the viewer destroys it; either way the run went on unseen.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from wsi_vssm.errors import WsiVssmError
from wsi_vssm.napari_plugin._layers import META_KEY, prediction_layers
from wsi_vssm.napari_plugin._predict import DEFAULT_MODEL, DEFAULT_OUT, PredictRequest, run_prediction, summary


class _Progress(QObject):
    """Carries progress from the worker thread to the GUI thread (a queued signal)."""

    changed = Signal(int, int, str)


class PredictWidget(QWidget):
    """Model picker, mpp override, TTA, device, output folder, Predict / Cancel, progress and the slide
    probability."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.cancel_event: threading.Event | None = None
        self._running: set[threading.Event] = set()  # the events of runs not finished yet
        self.destroyed.connect(lambda *_, runs=self._running: _cancel_all(runs))  # must not hold `self`
        self.last_result = None  # PredictResult of the last successful run
        self._slide_layer, self._succeeded = None, False
        self._progress = _Progress()
        self._progress.changed.connect(self._on_progress)
        self._mpp_slide = ""  # the slide the mpp box was last set for: another slide starts at "from file"
        self._build()
        self.slide_combo.currentTextChanged.connect(self._on_slide_changed)
        self.viewer.layers.events.inserted.connect(self._on_inserted)
        self.viewer.layers.events.removed.connect(self._refresh_slides)
        self.viewer.layers.events.changed.connect(self._refresh_slides)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_renamed)
        self._refresh_slides()

    # ---- layout ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.slide_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItem(DEFAULT_MODEL)
        self.model_combo.setCurrentIndex(0)
        self.model_combo.setToolTip('"default" (the packaged model) or a model file (.pt)')
        browse_model = QPushButton("…")
        browse_model.clicked.connect(self._browse_model)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.0, 20.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSpecialValueText("from file")  # shown at 0: use the slide's own resolution
        self.mpp_spin.setSuffix(" um/px")
        self.tta_check = QCheckBox("test-time augmentation (8 views, about 8x the time)")
        self.tta_check.setToolTip("predict --tta: the mean over the 8 flips and quarter turns; without it a turned "
                                  "slide's call can move (docs/model_card.md)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.setToolTip("predict --device: auto takes a CUDA GPU when there is one")
        self.out_edit = QLineEdit(str(DEFAULT_OUT))
        browse_out = QPushButton("…")
        browse_out.clicked.connect(self._browse_out)
        self.predict_button = QPushButton("Predict")
        self.predict_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Model", _row(self.model_combo, browse_model))
        form.addRow("mpp", self.mpp_spin)
        form.addRow("TTA", self.tta_check)
        form.addRow("Device", self.device_combo)
        form.addRow("Output", _row(self.out_edit, browse_out))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(_row(self.predict_button, self.cancel_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.result_label)
        layout.addStretch(1)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "", "wsi-vssm model (*.pt);;All files (*)")
        if path:
            self.model_combo.setEditText(path)

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if path:
            self.out_edit.setText(path)

    # ---- slide layers ---------------------------------------------------------------------------------------
    def slide_layers(self) -> list:
        return [ly for ly in self.viewer.layers if (ly.metadata.get(META_KEY) or {}).get("kind") == "slide"]

    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self._on_renamed)
        self._refresh_slides()

    def _on_renamed(self, event) -> None:
        """A slide layer renamed in the layer list: the Slide box follows it (it kept the old name, and Predict
        then said "open a slide first")."""
        layer, old = event.source, self.slide_combo.currentText()
        names = {ly.name for ly in self.slide_layers()}
        renamed = old not in names and layer.name in names  # the selected slide itself was renamed
        if renamed and self._mpp_slide == old:
            self._mpp_slide = layer.name  # the same slide under a new name keeps its mpp
        self._refresh_slides(prefer=layer.name if renamed else None)

    def _refresh_slides(self, event=None, prefer: str | None = None) -> None:
        current = prefer or self.slide_combo.currentText()
        names = [ly.name for ly in self.slide_layers()]
        self.slide_combo.blockSignals(True)  # the box is refilled: only where it ends up counts as a change
        try:
            self.slide_combo.clear()
            self.slide_combo.addItems(names)
            active = self.viewer.layers.selection.active
            preferred = current if current in names else (active.name if active is not None else "")
            if preferred in names:
                self.slide_combo.setCurrentText(preferred)
        finally:
            self.slide_combo.blockSignals(False)
        self._on_slide_changed(self.slide_combo.currentText())

    def _on_slide_changed(self, name: str) -> None:
        """Another slide picked: the mpp box goes back to "from file". A value typed for one slide (one that states
        no resolution, or an override) was kept for the next and silently rescaled it (a 0.972 um/px mosaic read
        at 0.5 lost its lesion)."""
        if name and self._mpp_slide and name != self._mpp_slide and self.mpp_spin.value():
            self.mpp_spin.setValue(0.0)
        if name:
            self._mpp_slide = name

    def _selected_slide(self):
        name = self.slide_combo.currentText()
        return next((ly for ly in self.slide_layers() if ly.name == name), None)

    # ---- running --------------------------------------------------------------------------------------------
    def request(self) -> PredictRequest | None:
        """The request the current settings describe, or None (with a notification) when there is no slide."""
        from napari.utils.notifications import show_error

        layer = self._selected_slide()
        if layer is None:
            show_error("wsi-vssm: open a slide first (File > Open), then pick it in the Slide box")
            return None
        path = layer.metadata[META_KEY].get("path")
        if not path:
            show_error(f"wsi-vssm: layer {layer.name!r} has no slide file to predict from")
            return None
        mpp = self.mpp_spin.value() or None
        model = self.model_combo.currentText().strip() or DEFAULT_MODEL
        out_root = self.out_edit.text().strip() or str(DEFAULT_OUT)
        out = Path(os.path.expanduser(out_root))
        if out.exists() and not out.is_dir():  # it failed after the whole slide, as "an unexpected error"
            show_error(f"wsi-vssm: Output {out} is a file, not a folder: choose another Output folder")
            return None
        return PredictRequest(slide=path, model=model, mpp=mpp, out_root=out_root, tta=self.tta_check.isChecked(),
                              device=self.device_combo.currentText())

    def start(self) -> None:
        """Start prediction for the selected slide layer in a background worker (no-op while one runs)."""
        from superqt.utils import FunctionWorker

        if self.worker is not None:
            return
        request = self.request()
        if request is None:
            return
        self.cancel_event = threading.Event()
        self._running.add(self.cancel_event)
        self._slide_layer, self._succeeded = self._selected_slide(), False
        worker = FunctionWorker(run_prediction, request, progress=self._progress.changed.emit,
                                cancel=self.cancel_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.warned.connect(self._on_warned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True)
        self.status_label.setText("starting")
        self.result_label.setText("")
        worker.start()

    def cancel(self) -> None:
        if self.cancel_event is not None and self.worker is not None:  # a run under way, not one that ended
            self.cancel_event.set()
            self.status_label.setText("cancelling…")

    def _set_running(self, running: bool) -> None:
        self.predict_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_progress(self, done: int, total: int, stage: str) -> None:
        self.progress_bar.setRange(0, max(1, total))
        self.progress_bar.setValue(min(done, max(1, total)))
        self.status_label.setText(f"{stage} {done}/{total}")

    def _on_returned(self, result) -> None:
        from napari.layers import Layer
        from napari.utils.notifications import show_info, show_warning

        self.last_result, self._succeeded = result, True
        self._match_slide_scale(result.record)
        for data, kwargs, layer_type in prediction_layers(result.out_dir):
            for old in [ly for ly in self.viewer.layers if ly.name == kwargs["name"]]:
                self.viewer.layers.remove(old)  # a rerun replaces its layers
            self.viewer.add_layer(Layer.create(data, kwargs, layer_type))
        text = summary(result.record)
        self.result_label.setText(f"{text}\noutputs: {result.out_dir}")
        from wsi_vssm.pipeline.predict import few_cells_of

        # a warning toast for a slide out of domain or a doubtful call: an info toast replaced the run's own warning
        doubtful = result.record.get("in_domain") is False or few_cells_of(result.record) is not None
        (show_warning if doubtful else show_info)(f"wsi-vssm: {text}")

    def _match_slide_scale(self, record: dict) -> None:
        """Put the slide layer in um at the mpp prediction used (when the file had none, or it was overridden)."""
        layer = self._slide_layer
        mpp = (record.get("mpp") or {}).get("slide")
        if layer is None or mpp is None or layer not in self.viewer.layers:
            return
        if tuple(layer.scale[-2:]) != (mpp, mpp):
            layer.scale = (mpp, mpp)
            layer.units = ("um", "um")
            layer.metadata[META_KEY]["mpp"] = mpp

    def _on_errored(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error, show_info

        from wsi_vssm.pipeline.predict import Cancelled

        if isinstance(err, Cancelled):
            show_info("wsi-vssm: prediction cancelled")
            self.result_label.setText("cancelled")
        elif isinstance(err, WsiVssmError):
            from wsi_vssm.io.errors import MissingMpp

            # the library's advice names command-line flags the widget does not have
            hint = (" (here: set it in the mpp box above)" if isinstance(err, MissingMpp) else
                    " (here: pick cpu or auto in the Device box)" if "--device" in str(err) else "")
            show_error(f"wsi-vssm: {err}{hint}")
            self.result_label.setText(f"failed: {err}{hint}")
        else:  # a bug, not bad input: say so rather than take the viewer down
            show_error(f"wsi-vssm: unexpected error ({type(err).__name__}): {err}")
            self.result_label.setText(f"failed: {type(err).__name__}: {err}")

    def _on_warned(self, show_warn_args: tuple) -> None:
        from napari.utils.notifications import show_warning

        show_warning(f"wsi-vssm: {show_warn_args[0]}")

    def _on_finished(self) -> None:
        self._running.clear()  # one run at a time: it has ended
        self.worker = None
        self._set_running(False)
        self.status_label.setText("done" if self._succeeded else "stopped")

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.cancel()
        super().closeEvent(event)

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ParentChange and self.parent() is None:  # closed with the dock's X
            self.cancel()
        return super().event(event)


def _cancel_all(runs: set[threading.Event]) -> None:
    for run in runs:
        run.set()


def _row(*widgets: QWidget) -> QWidget:
    box = QWidget()
    layout = QHBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        layout.addWidget(w)
    return box
