"""`wsi-vssm info RUN`: where a recipe run (`wsi-vssm run RECIPE --out RUN`) stands, stage by stage: done (its
model file), in progress or stopped (the epoch its checkpoint holds, of how many, and the best selection score so
far), or not started; and whether RUN/model.pt is this run's result. Hours of CPU training are checked without
opening logs; nothing is changed (a checkpoint is read, its random states are not restored)."""

from __future__ import annotations

import json
from pathlib import Path

from wsi_vssm.training.recipe import RESOLVED_JSON  # light: torch only when a checkpoint is read


def is_recipe_folder(path: str) -> bool:
    return (Path(path) / RESOLVED_JSON).is_file()


def recipe_info(path: str) -> dict:
    """{kind: recipe_run, folder, recipe (its name), stages: [{stage, status, file, epoch, epochs, best, best_epoch}],
    model, model_finished}; a checkpoint that cannot be read is said in its stage's `note`."""
    from wsi_vssm.training.recipe import CHECKPOINTS, WORK_MODEL, read_progress
    from wsi_vssm.training.recipe_config import recipe_stages

    out = Path(path)
    resolved = _json(out / RESOLVED_JSON) or {}
    done = {d.get("stage") for d in read_progress(out)}
    stages = []
    for stage in recipe_stages(resolved):
        entry = {"stage": stage, "status": "not started", "file": None, "epoch": None, "epochs": None,
                 "best": None, "best_epoch": None, "note": None}
        ckpt = out / CHECKPOINTS.get(stage, "-")
        if stage in done and (out / f"{stage}.pt").is_file():
            entry.update(status="done", file=str(out / f"{stage}.pt"))
        if ckpt.is_file() and (entry["status"] != "done" or stage == "dense"):  # dense keeps its own when done
            entry.update(_checkpoint_progress(ckpt))
            if entry["status"] != "done":
                entry.update(status="in progress or stopped", file=str(ckpt))
        stages.append(entry)
    model = out / "model.pt"
    return {"kind": "recipe_run", "folder": str(out), "recipe": (resolved.get("recipe") or {}).get("name"),
            "stages": stages, "model": str(model) if model.is_file() else None,
            # the stages pass their model in the work file; model.pt is replaced only when all are through
            "model_finished": model.is_file() and not (out / WORK_MODEL).is_file()
            and all(s["status"] == "done" for s in stages)}


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _checkpoint_progress(path: Path) -> dict:
    """The epoch a cells / context / dense checkpoint holds, of how many, and its best selection score."""
    from wsi_vssm.training.checkpoint import peek_checkpoint

    try:
        ck = peek_checkpoint(path)
        state = ck.get("state", ck)  # dense keeps its counters under `state`
        best = state.get("best_score", state.get("best"))
        return {"epoch": int(state["epoch"]), "epochs": int(ck.get("config", {}).get("epochs")),
                "best": None if best is None or best < 0 else round(float(best), 4),
                "best_epoch": int(state.get("best_epoch") or 0) or None}
    except Exception as err:  # noqa: BLE001  (a damaged or foreign checkpoint is said, not fatal)
        return {"note": f"{path}: cannot read this checkpoint ({type(err).__name__})"}


def format_recipe_info(r: dict) -> str:
    n_done = sum(s["status"] == "done" for s in r["stages"])
    lines = [f"recipe run: {r['folder']} (recipe {r['recipe'] or '?'}; {n_done} of {len(r['stages'])} stage(s) done)"]
    for s in r["stages"]:
        what = s["status"]
        if s["epoch"] is not None:
            what += f": epoch {s['epoch']} of {s['epochs']}"
            if s["best"] is not None:
                what += f", best selection score {s['best']:.4f} (epoch {s['best_epoch']})"
        if s["note"]:
            what += f" ({s['note']})"
        if s["file"]:
            what += f" -> {s['file']}"
        lines.append(f"  {s['stage']}: {what}")
    if r["model_finished"]:
        lines.append(f"model: {r['model']} (every stage through)")
    elif r["model"]:
        lines.append(f"model: {r['model']} is an earlier run's (this one has not finished: run --resume)")
    else:
        lines.append("model: none yet (run --resume to go on)")
    return "\n".join(lines)
