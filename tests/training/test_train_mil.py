"""MIL training on tiny synthetic feature stores: it learns a planted signal, checkpoints reload exactly, mixed
backbones and leaky splits are refused, and the `train mil` command splits as it says."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsi_vssm.errors import UsageError
from wsi_vssm.pipeline.store import STORE_FORMAT, CellFeatures, FeatureStore
from wsi_vssm.training.mil import (
    LOG_COLUMNS,
    MILTrainConfig,
    load_mil,
    stratified_split,
    train_mil,
)

F = 16


def _store(path, seed: int, tumour: bool, model_hash: str = "h0", n: int = 40, **extra):
    """A bag of `n` Gaussian cells; a tumour bag has a few cells with feature 0 raised (the planted lesion);
    `extra`: more store attrs (extract settings)."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, F)).astype(np.float32)
    if tumour:
        feats[rng.choice(n, 4, replace=False), 0] += 6.0
    xy = np.stack([np.arange(n) * 32, np.zeros(n)], 1).astype(np.int64)
    attrs = {"format": STORE_FORMAT, "slide": path.stem, "model_id": "micro", "model_hash": model_hash, "mpp": 0.97,
             "token_px": 32, "n_features": F, **extra}
    cells = CellFeatures(feats.astype(np.float16), xy, xy.astype(np.float32), np.zeros(n, np.int32),
                         np.ones(n, np.float16), attrs)
    return FeatureStore.write(path, cells).path


@pytest.fixture(autouse=True)
def _one_thread():
    """Bags of 40 x 16 are far too small for intra-op threads; one thread avoids their wake-up cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def feature_bags(tmp_path_factory):
    """16 slides: names t00..t07 (tumour) and n00..n07 (normal) in one features folder."""
    d = tmp_path_factory.mktemp("feat")
    bags = {}
    for i in range(8):
        bags[f"t{i:02d}"] = (_store(d / f"t{i:02d}.zarr", 100 + i, True), 1)
        bags[f"n{i:02d}"] = (_store(d / f"n{i:02d}.zarr", 200 + i, False), 0)
    return d, bags


def _split(bags):
    valid_names = {"t06", "t07", "n06", "n07"}
    train = [v for k, v in sorted(bags.items()) if k not in valid_names]
    valid = [v for k, v in sorted(bags.items()) if k in valid_names]
    return train, valid


def _reference(bags, extra: str = "") -> str:
    """A reference table of every fixture bag (`name,label` lines), then `extra` lines."""
    return "\n".join(f"{n},{y}" for n, (_, y) in sorted(bags.items())) + "\n" + extra


def _train_mil_cli(features, labels, out):
    """`wsi-vssm train mil` for one epoch on the CPU, as a click result."""
    from wsi_vssm.commands.train import command

    return CliRunner().invoke(command, ["mil", "--features", str(features), "--labels", str(labels), "--out",
                                        str(out), "--epochs", "1", "--device", "cpu"])


def test_learns_planted_signal_and_checkpoint_reloads_exactly(feature_bags, tmp_path):
    _, bags = feature_bags
    train, valid = _split(bags)
    cfg = MILTrainConfig(epochs=8, patience=8, lr=3e-3, seed=1)
    log, ckpt = tmp_path / "log.csv", tmp_path / "mil.pt"
    with pytest.warns(UserWarning, match="cell scores stay random"):  # no trained cell head given
        model, hist = train_mil(train, valid, cfg, log_path=log, checkpoint_path=ckpt)
    assert hist.best_valid_auc == 1.0 and hist.best_valid_loss < 0.2  # confident, not just well ranked
    assert hist.rows[-1]["train_loss"] < 0.25 * hist.rows[0]["train_loss"]
    tumour = FeatureStore.open(valid[-1][0]).read_features().astype(np.float32)  # t07
    with torch.inference_mode():
        attention = model(torch.from_numpy(tumour)).attention[0]
    assert tumour[int(attention.argmax()), 0] > 3, "attention finds a planted cell"
    rows = list(csv.DictReader(log.open()))
    assert tuple(rows[0]) == LOG_COLUMNS and len(rows) == len(hist.rows)

    raw = torch.load(ckpt, weights_only=True)  # tensors and plain containers only
    assert raw["format"] == "wsi-vssm-mil/1" and raw["mil_config"]["in_dim"] == F
    meta = raw["metadata"]
    assert meta["seed"] == 1 and meta["best_epoch"] == hist.best_epoch and meta["valid_auc"] == 1.0
    assert sorted(meta["valid_slides"]) == ["n06", "n07", "t06", "t07"] and len(meta["train_slides"]) == 12
    assert meta["features"]["model_hash"] == "h0" and meta["features"]["token_px"] == 32
    assert meta["date"] and meta["torch_threads"] == torch.get_num_threads() and meta["machine"]  # where it was made
    again, meta2 = load_mil(ckpt)
    x = torch.from_numpy(FeatureStore.open(valid[0][0]).read_features().astype(np.float32))
    with torch.inference_mode():
        a, b = model(x), again(x)
    assert torch.equal(a.slide_logit, b.slide_logit) and torch.equal(a.attention, b.attention)
    assert meta2["train_config"]["lr"] == 3e-3


def test_same_seed_same_model_and_cell_head_frozen(feature_bags):
    _, bags = feature_bags
    train, valid = _split(bags)
    head = {"weight": torch.full((1, F), 0.5), "bias": torch.tensor([-1.0])}
    cfg = MILTrainConfig(epochs=2, patience=5, seed=7)
    m1, h1 = train_mil(train, valid, cfg, cell_head=head)
    m2, h2 = train_mil(train, valid, cfg, cell_head=head)
    assert [r["train_loss"] for r in h1.rows] == [r["train_loss"] for r in h2.rows]
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert torch.equal(m1.cell_head.weight, head["weight"]) and torch.equal(m1.cell_head.bias, head["bias"])
    m3, _ = train_mil(train, valid, MILTrainConfig(epochs=2, seed=7, train_cell_head=True), cell_head=head)
    assert not torch.equal(m3.cell_head.weight, head["weight"])


def test_starts_from_an_initial_state(feature_bags):
    from wsi_vssm.errors import UsageError
    from wsi_vssm.models.mil import AttentionMIL, MILConfig

    _, bags = feature_bags
    train, valid = _split(bags)
    torch.manual_seed(123)
    start = AttentionMIL(MILConfig(F, dropout=0.0)).state_dict()
    head = {"weight": torch.full((1, F), 0.5), "bias": torch.tensor([-1.0])}
    cfg = MILTrainConfig(epochs=1, patience=1, lr=1e-6, seed=7, dropout=0.0)
    m, _ = train_mil(train, valid, cfg, cell_head=head, init_state=start)
    fresh, _ = train_mil(train, valid, cfg, cell_head=head)
    w = m.state_dict()["attn_w.weight"]
    assert torch.allclose(w, start["attn_w.weight"], atol=1e-4)  # 12 steps of lr 1e-6 barely move it
    assert not torch.allclose(fresh.state_dict()["attn_w.weight"], start["attn_w.weight"], atol=1e-2)
    assert torch.equal(m.cell_head.weight, head["weight"])  # the given cell head wins over init_state's
    with pytest.raises(UsageError, match="init_state"):
        train_mil(train, valid, MILTrainConfig(epochs=1, hidden_dim=8), init_state=start)


def test_refuses_mixed_backbones_and_leaky_splits(feature_bags, tmp_path):
    _, bags = feature_bags
    train, valid = _split(bags)
    other = _store(tmp_path / "x.zarr", 5, True, model_hash="h1")
    with pytest.raises(UsageError, match="model_hash.*cannot be mixed"):
        train_mil(train + [(other, 1)], valid, MILTrainConfig(epochs=1))
    with pytest.raises(UsageError, match="both training and validation"):
        train_mil(train, valid + [train[0]], MILTrainConfig(epochs=1))
    with pytest.raises(UsageError, match="no validation slides"):
        train_mil(train, [], MILTrainConfig(epochs=1))
    with pytest.raises(UsageError, match="epochs"):
        MILTrainConfig(epochs=0)


def test_stratified_split_is_seeded_and_keeps_both_classes():
    names = [f"s{i}" for i in range(10)]
    labels = [0] * 6 + [1] * 4
    tr, va = stratified_split(names, labels, 0.25, seed=3)
    assert (tr, va) == stratified_split(names, labels, 0.25, seed=3)
    assert not set(tr) & set(va) and sorted(tr + va) == sorted(names)
    lab = dict(zip(names, labels, strict=True))
    assert sorted({lab[n] for n in va}) == [0, 1] and sorted({lab[n] for n in tr}) == [0, 1]
    assert stratified_split(names, labels, 0.25, seed=4) != (tr, va)


def test_cli_train_mil_with_manifest_split_and_with_valid_fraction(feature_bags, tmp_path):
    from wsi_vssm.commands.train import command

    d, bags = feature_bags
    man = tmp_path / "manifest.csv"
    lines = ["slide,label,split"]
    for name, (_, y) in sorted(bags.items()):
        split = ("valid" if name in ("t06", "t07", "n06", "n07") else "test" if name in ("t05", "n05")
                 else "" if name == "t04" else "train")
        lines.append(f"slides/{name}.tif,{y},{split}")
    man.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mil.pt"
    args = ["mil", "--features", str(d), "--labels", str(man), "--out", str(out), "--epochs", "3", "--device", "cpu"]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 0, res.output
    assert "9 training and 4 validation slides (split column" in res.stdout
    assert f"1 blank-split and 2 test row(s) of {man} left out by its split column" in res.stdout  # t04 said too
    assert "epoch 3:" in res.stdout and out.is_file() and (tmp_path / "mil.log.csv").is_file()
    meta = torch.load(out, weights_only=True)["metadata"]
    assert not {"t04", "t05", "n05"} & set(meta["train_slides"] + meta["valid_slides"])
    res = CliRunner().invoke(command, [*args, "--epochs", "1", "--valid-fraction", "0.25"])  # test rows: said too
    assert res.exit_code == 0, res.output
    assert f"seed 0; 2 test row(s) of {man} left out by its split column)" in res.stdout

    ref = tmp_path / "reference.csv"  # CAMELYON16 style, no split: a seeded stratified split
    ref.write_text("".join(f"{n.upper()},{'Tumor' if y else 'Normal'}\n" for n, (_, y) in sorted(bags.items())))
    res = CliRunner().invoke(command, ["mil", "--features", str(d), "--labels", str(ref), "--out", str(out),
                                       "--epochs", "1", "--valid-fraction", "0.25", "--log", str(tmp_path / "l.json")])
    assert res.exit_code == 0, res.output
    assert "12 training and 4 validation slides (seeded stratified split" in res.stdout
    assert (tmp_path / "l.json").is_file()
    assert not math.isnan(torch.load(out, weights_only=True)["metadata"]["valid_loss"])


def test_cli_valid_labels_obeys_both_split_columns_and_says_what_it_left_out(feature_bags, tmp_path):
    """Rows of --labels marked valid or test were dropped without a word (the help said all of --labels trains);
    rows of --valid-labels marked train or test were validated on."""
    from wsi_vssm.commands.train import command

    d, bags = feature_bags
    man, vman = tmp_path / "train.csv", tmp_path / "valid.csv"
    splits = {"t06": "valid", "n06": "valid", "t07": "test"}
    man.write_text("slide,label,split\n" + "".join(f"{n},{y},{splits.get(n, 'train' if n < 'n03' else '')}\n"
                                                  for n, (_, y) in sorted(bags.items()) if n != "n07"))
    vman.write_text("slide,label,split\nt06,1,valid\nn06,0,\nn07,0,train\nt07,1,test\n")
    out = tmp_path / "m.pt"
    res = CliRunner().invoke(command, ["mil", "--features", str(d), "--labels", str(man), "--valid-labels",
                                       str(vman), "--out", str(out), "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (f"12 training and 2 validation slides (validation slides from {vman}; 1 test and 2 valid row(s) of {man} "
            f"left out by its split column; 1 test and 1 train row(s) of {vman} left out by its split column)"
            in res.stdout), res.stdout
    meta = torch.load(out, weights_only=True)["metadata"]
    assert sorted(meta["valid_slides"]) == ["n06", "t06"]
    assert not {"t06", "n06", "t07", "n07"} & set(meta["train_slides"])
    assert "valid or test" in CliRunner().invoke(command, ["mil", "--help"]).stdout  # the help says so


def test_cli_a_slide_in_both_label_tables_is_named(feature_bags, tmp_path, capsys):
    """A slide in both tables: train_mil's "2 slide(s) are in both training and validation, e.g. <store>" named
    neither table nor line; now the first such slide is named before any feature is read."""
    d, bags = feature_bags
    man, vman = tmp_path / "train.csv", tmp_path / "valid.csv"
    man.write_text("slide,label\n" + "".join(f"{n.upper()},{y}\n" for n, (_, y) in sorted(bags.items())))
    vman.write_text("slide,label\nt07,1\nn07,0\n")
    _one_line_error(["train", "mil", "--features", d, "--labels", man, "--valid-labels", vman, "--out",
                     tmp_path / "m.pt", "--epochs", "1", "--device", "cpu"], capsys,
                    f"slide 'N07' is in both --labels {man} (line 9) and --valid-labels {vman} (line 3)")
    assert not (tmp_path / "m.pt").exists()


def test_cell_head_comes_from_the_model_that_made_the_features(feature_bags, tmp_path):
    import warnings

    from wsi_vssm.commands.train import command
    from wsi_vssm.models.model_file import load_backbone
    from wsi_vssm.training.mil import cell_head_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone, info = load_backbone("micro")
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"mil.cell_head.weight": torch.ones(1, 256), "mil.cell_head.bias": torch.zeros(1)})
    path = tmp_path / "model.pt"
    torch.save({"format": "wsi-vssm-model/1", "backbone_config": backbone.config.to_dict(), "mpp": 0.97,
                "token_px": 32, "state_dict": sd}, path)
    head, backbone_hash = cell_head_from_model(path)
    assert backbone_hash == info.model_hash and torch.equal(head["weight"], torch.ones(1, 256))
    d, bags = feature_bags  # these stores say model_hash "h0": made by another backbone
    ref = tmp_path / "reference.csv"
    ref.write_text("".join(f"{n},{y}\n" for n, (_, y) in sorted(bags.items())))
    res = CliRunner().invoke(command, ["mil", "--features", str(d), "--labels", str(ref), "--out",
                                       str(tmp_path / "m.pt"), "--model", str(path), "--epochs", "1"])
    assert isinstance(res.exception, UsageError) and "another backbone" in str(res.exception)


def test_count_head_is_fitted_exactly(feature_bags, tmp_path):
    """pool "count": three parameters fitted by L-BFGS logistic regression, so the loss gradient is ~0 at the
    result; the planted cells (feature 0 raised, which this cell head reads) make tumour bags count more."""
    import torch.nn.functional as Fn

    from wsi_vssm.models.mil import count_stats
    from wsi_vssm.training.mil import COUNT_L2

    _, bags = feature_bags
    train, valid = _split(bags)
    head = {"weight": torch.zeros((1, F)), "bias": torch.tensor([-3.0])}
    head["weight"][0, 0] = 1.0  # a cell counts when feature 0 >= 3.0 (threshold 0 on this logit)
    ckpt = tmp_path / "count.pt"
    model, hist = train_mil(train, valid, MILTrainConfig(pool="count", count_threshold=0.0), cell_head=head,
                            checkpoint_path=ckpt, log_path=tmp_path / "log.csv")
    assert len(hist.rows) == 1 and hist.best_epoch == 1 and hist.best_valid_auc == 1.0
    assert model.count_affine.weight[0, 0] > 0  # more counted cells, higher slide logit
    x = torch.stack([count_stats(model.cell_head(torch.from_numpy(
        FeatureStore.open(p).read_features().astype(np.float32))).squeeze(-1)[None], None, 0.0)[0]
        for p, _ in train]).double()
    y = torch.tensor([float(lbl) for _, lbl in train], dtype=torch.float64)
    w = model.count_affine.weight.detach().double()[0].clone().requires_grad_(True)
    b = model.count_affine.bias.detach().double()[0].clone().requires_grad_(True)
    loss = Fn.binary_cross_entropy_with_logits(x @ w + b, y) + COUNT_L2 * (w ** 2).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and abs(float(b.grad)) < 1e-4  # at the optimum (float32 storage)
    again, meta = load_mil(ckpt)
    assert again.config.pool == "count" and again.config.count_threshold == 0.0 and meta["best_epoch"] == 1
    assert torch.equal(again.count_affine.weight, model.count_affine.weight)


# ---- input checks of `train mil`: stores missing, stores without cells, a folder without stores -------------


def _one_line_error(args, capsys, *parts: str) -> str:
    from conftest import run_cli_captured

    code, out, err = run_cli_captured(args, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("wsi-vssm: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return err


def test_cli_labelled_slides_without_a_store_are_named_once_before_the_split(feature_bags, tmp_path):
    """The stratified split only takes slides with a store: the warning must come before it, or never."""
    from wsi_vssm.commands.train import command

    d, bags = feature_bags
    ref = tmp_path / "reference.csv"
    rows = [f"{n},{y}" for n, (_, y) in sorted(bags.items())] + ["gone1,1", "gone2,0"]
    ref.write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(command, ["mil", "--features", str(d), "--labels", str(ref), "--out",
                                       str(tmp_path / "m.pt"), "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if "no feature store" in line]
    assert warned == [f"wsi-vssm: warning: 2 of 18 labelled slide(s) have no feature store in {d} and are left "
                      "out: gone1, gone2"]
    assert "12 training and 4 validation slides" in res.stdout


def test_a_validation_slide_without_cells_is_left_out_with_a_warning(feature_bags, tmp_path):
    """A cell-less store has no slide score; left in, it took the only normal slide out of the AUC, silently
    (NaN every epoch). Now it is named and left out, and the undefined AUC is said once."""
    _, bags = feature_bags
    train, _ = _split(bags)
    empty = _store(tmp_path / "blank.zarr", 9, False, n=0)
    head = {"weight": torch.full((1, F), 0.5), "bias": torch.tensor([-1.0])}
    with pytest.warns(UserWarning) as got:
        _, hist = train_mil(train, [bags["t06"], (empty, 0)], MILTrainConfig(epochs=2, seed=1), cell_head=head)
    texts = [str(w.message) for w in got]
    assert "1 validation slide(s) have no cells (no tissue found) and are left out of validation: blank" in texts
    assert sum("AUC is undefined" in t for t in texts) == 1
    assert hist.metadata["valid_slides"] == ["t06"]
    with pytest.raises(UsageError, match="no validation slides"), pytest.warns(UserWarning, match="no cells"):
        train_mil(train, [(empty, 0)], MILTrainConfig(epochs=1), cell_head=head)


def test_cli_validation_auc_undefined_is_said_not_printed_as_nan(feature_bags, tmp_path):
    from wsi_vssm.commands.train import command

    d, bags = feature_bags
    man = tmp_path / "manifest.csv"
    man.write_text("slide,label,split\nt00,1,train\nn00,0,train\nt01,1,train\nn01,0,train\nt06,1,valid\n")
    res = CliRunner().invoke(command, ["mil", "--features", str(d), "--labels", str(man), "--out",
                                       str(tmp_path / "m.pt"), "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "valid AUC undefined" in res.stdout and "nan" not in res.stdout
    assert res.stderr.count("AUC is undefined") == 1


def test_cli_features_folder_without_stores_is_named(feature_bags, tmp_path, capsys):
    d, bags = feature_bags
    ref = tmp_path / "reference.csv"
    ref.write_text("a,1\nb,0\n")
    (tmp_path / "empty").mkdir()
    args = ["train", "mil", "--labels", ref, "--out", tmp_path / "m.pt", "--features"]
    _one_line_error([*args, tmp_path / "empty"], capsys, f"--features {tmp_path / 'empty'}",
                    "holds no feature stores", "<slide>.zarr", "wsi-vssm extract")
    _one_line_error([*args, d], capsys, f"--features {d}", "none of the 2 labelled slide(s)", "reference.csv",
                    "n00")
    assert not (tmp_path / "m.pt").exists()


def test_train_mil_takes_the_default_model_by_name(tmp_path, capsys):
    """`--model default` works for predict and extract; train mil refused it as a missing file."""
    from conftest import run_cli_captured

    for i, tumour in enumerate((True, False, True, False)):
        _store(tmp_path / "f" / f"s{i}.zarr", i, tumour)  # stores of another backbone than the default's
    (tmp_path / "labels.csv").write_text("slide,label\n" + "".join(f"s{i},{i % 2 == 0:d}\n" for i in range(4)))
    code, _, err = run_cli_captured(["train", "mil", "--features", tmp_path / "f", "--labels", tmp_path / "labels.csv",
                                     "--model", "default", "--out", tmp_path / "m.pt", "--epochs", "1"], capsys)
    assert code == 1 and "features were made by another backbone than the one in" in err and "default.pt" in err


def test_train_mil_model_that_is_a_folder_says_so(tmp_path, capsys):
    """--model FOLDER said "no such model file"."""
    from conftest import run_cli_captured

    for i, tumour in enumerate((True, False, True, False)):
        _store(tmp_path / "f" / f"s{i}.zarr", i, tumour)
    (tmp_path / "labels.csv").write_text("slide,label\n" + "".join(f"s{i},{i % 2 == 0:d}\n" for i in range(4)))
    (tmp_path / "adir.pt").mkdir()
    code, _, err = run_cli_captured(["train", "mil", "--features", tmp_path / "f", "--labels", tmp_path / "labels.csv",
                                     "--model", tmp_path / "adir.pt", "--out", tmp_path / "m.pt"], capsys)
    assert code == 2 and "adir.pt: is a folder, not a model file" in err, err


def test_cli_a_handful_of_validation_slides_is_warned_about(feature_bags, tmp_path):
    """Two validation slides gave valid AUC 1.000 from epoch 1 and a silent choice of epoch; evaluate warns about
    so few slides of a class, train mil did not."""
    from wsi_vssm.commands.train import command

    d, _ = feature_bags
    man = tmp_path / "manifest.csv"
    man.write_text("slide,label,split\nt00,1,train\nn00,0,train\nt01,1,train\nn01,0,train\nt06,1,valid\n"
                   "n06,0,valid\n")
    res = CliRunner().invoke(command, ["mil", "--features", str(d), "--labels", str(man), "--out",
                                       str(tmp_path / "m.pt"), "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("selection rests on 1 tumour and 1 normal validation slide(s)") == 1, res.stderr


def test_bags_past_the_cache_budget_keep_the_ones_that_fit(tmp_path, monkeypatch):
    """The cache was all or nothing: bags just over the budget were all read again every epoch. Those that fit
    stay now, and only the rest are read again."""
    from wsi_vssm.training.mil import Bags

    paths = [(_store(tmp_path / f"s{i}.zarr", i, bool(i % 2)), i % 2) for i in range(4)]
    one_bag_mb = 40 * F * 2 / 2**20
    reads = []
    real_read = FeatureStore.read_features
    monkeypatch.setattr(FeatureStore, "read_features", lambda self: reads.append(self.name) or real_read(self))
    bags = Bags(paths, cache_mb=2.5 * one_bag_mb)
    for _ in range(3):  # three epochs
        for i in range(4):
            assert bags.features(i).shape == (40, F)
    assert sorted(reads) == ["s0", "s1", "s2", "s2", "s2", "s3", "s3", "s3"]
    part = bags.subset([3, 1])  # (the bags with cells, say) shares what was read
    assert part.names() == ["s3", "s1"] and part.labels == [1, 1]
    reads.clear()
    part.features(1)
    part.features(0)
    assert reads == ["s3"]


def test_heads_trained_in_turn_on_the_same_bags_read_each_store_once_with_a_cell_less_one(tmp_path, monkeypatch):
    """The bags less the cell-less ones were made anew for each member of an ensemble, so each member read every
    store again."""
    from wsi_vssm.training.mil import Bags

    def bag(name, seed, tumour, n=40):
        return _store(tmp_path / f"{name}.zarr", seed, tumour, n=n), int(tumour)

    train = Bags([bag(f"t{i}", i, True) for i in range(3)] + [bag(f"n{i}", 10 + i, False) for i in range(3)]
                 + [bag("empty", 99, False, n=0)], 4096.0)
    valid = Bags([bag("vt", 20, True), bag("vn", 21, False)], 4096.0)
    reads = []
    real_read = FeatureStore.read_features
    monkeypatch.setattr(FeatureStore, "read_features", lambda self: reads.append(self.name) or real_read(self))
    for seed in (1, 2):
        with pytest.warns(UserWarning, match="have no cells"):
            train_mil(train, valid, MILTrainConfig(epochs=2, seed=seed))
    assert sorted(reads) == sorted(["t0", "t1", "t2", "n0", "n1", "n2", "vt", "vn"])


def test_cli_train_mil_ensemble_writes_the_mean_of_its_seeds(tmp_path, capsys, monkeypatch):
    """`train mil --ensemble 3 --model M`: three heads on one split, seeds 5-7, sharing M's cell head, kept as
    OUT-seedS.pt, and OUT their mean (a MILEnsemble that attach_mil takes). Without --model, or with a trainable
    cell head, it is refused: the members would not share one cell head."""
    import warnings

    from conftest import run_cli_captured

    from wsi_vssm.commands.train import command
    from wsi_vssm.models.mil import MILEnsemble
    from wsi_vssm.models.model_file import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone, info = load_backbone("micro")
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"mil.cell_head.weight": torch.full((1, 256), 0.01), "mil.cell_head.bias": torch.zeros(1)})
    model = tmp_path / "model.pt"
    torch.save({"format": "wsi-vssm-model/1", "backbone_config": backbone.config.to_dict(), "mpp": 0.97,
                "token_px": 32, "state_dict": sd}, model)
    d = tmp_path / "feat"  # stores that this backbone made (its hash), 256 features wide
    lines = []
    for i in range(12):
        name = f"{'t' if i % 2 else 'n'}{i:02d}"
        path = d / f"{name}.zarr"
        rng = np.random.default_rng(i)
        feats = rng.standard_normal((40, 256)).astype(np.float32)
        if i % 2:
            feats[rng.choice(40, 4, replace=False), 0] += 6.0
        xy = np.stack([np.arange(40) * 32, np.zeros(40)], 1).astype(np.int64)
        attrs = {"format": STORE_FORMAT, "slide": name, "model_id": "micro", "model_hash": info.model_hash,
                 "mpp": 0.97, "token_px": 32, "n_features": 256}
        FeatureStore.write(path, CellFeatures(feats.astype(np.float16), xy, xy.astype(np.float32),
                                              np.zeros(40, np.int32), np.ones(40, np.float16), attrs))
        lines.append(f"{name.upper()},{'Tumor' if i % 2 else 'Normal'}\n")
    ref = tmp_path / "reference.csv"
    ref.write_text("".join(lines))
    out = tmp_path / "run.v2.pt"  # a dotted name: the members go beside it as run.v2-seedS.pt
    args = ["mil", "--features", str(d), "--labels", str(ref), "--out", str(out), "--epochs", "3", "--device", "cpu",
            "--seed", "5", "--ensemble", "3", "--model", str(model)]
    reads = []
    real_read = FeatureStore.read_features
    monkeypatch.setattr(FeatureStore, "read_features", lambda self: reads.append(self.name) or real_read(self))
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 0, res.output
    assert "mean of 3 heads (seeds 5-7): valid AUC" in res.stdout
    assert sorted(reads) == sorted(line.split(",")[0].lower() for line in lines)  # each store read once, not per seed
    members = [load_mil(tmp_path / f"run.v2-seed{s}.pt") for s in (5, 6, 7)]
    assert [m[1]["seed"] for m in members] == [5, 6, 7] and (tmp_path / "run.v2-seed6.log.csv").is_file()
    assert len({tuple(m[1]["valid_slides"]) for m in members}) == 1  # one split for all
    assert all(torch.equal(m[0].cell_head.weight, torch.full((1, 256), 0.01)) for m in members)  # M's, shared
    ens, meta = load_mil(out)
    assert isinstance(ens, MILEnsemble) and meta["seed"] == [5, 6, 7] and meta["best_epoch"] is None
    assert res.stderr.count("selection rests on") == 1, res.stderr  # the members' shared warning, said once
    from wsi_vssm.commands.model_info import format_model_info, model_info

    said = format_model_info(model_info(str(out)))  # it said "best epoch None of [3, 3, 3]"
    assert "best epochs per seed" in said and "None" not in said
    assert meta["train_config"]["seed"] == [5, 6, 7] and "history" not in meta
    x = torch.from_numpy(np.asarray(FeatureStore.open(d / "t01.zarr").features, dtype=np.float32))
    with torch.no_grad():
        mean = torch.stack([m[0](x).slide_logit for m in members]).mean(0)
        assert torch.allclose(ens(x).slide_logit, mean, atol=1e-6)
    for refused in ([*args, "--train-cell-head"], args[:-2]):  # a trainable cell head; no --model
        code, _, err = run_cli_captured(["train", *refused], capsys)
        assert code == 2 and err.count("\n") == 1 and "--ensemble shares one cell head" in err


def test_a_stopped_run_leaves_its_best_head_marked_unfinished(feature_bags, tmp_path):
    """Ctrl-C in `train mil` said "nothing was kept" while the best head so far stayed at --out, with
    metadata that looked finished, and `attach_mil` took it without a word."""
    from conftest import write_tiny_model

    from wsi_vssm.cli import _how_to_go_on
    from wsi_vssm.models.model_file import ModelFileError
    from wsi_vssm.models.slide_model import attach_mil, load_model

    _, bags = feature_bags
    train, valid = _split(bags)
    cfg = MILTrainConfig(epochs=8, patience=8, lr=3e-3, seed=1)
    ckpt = tmp_path / "mil.pt"

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        train_mil(train, valid, cfg, checkpoint_path=ckpt, progress=stop)
    assert torch.load(ckpt, weights_only=True)["metadata"]["training_incomplete"] is True
    write_tiny_model(tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="unfinished MIL training run"), pytest.raises(ModelFileError):
        attach_mil(load_model(tmp_path / "model.pt"), ckpt)  # said first, whatever else is wrong with it
    assert "marked unfinished" in _how_to_go_on(["train", "mil", "--out", str(ckpt)])
    from wsi_vssm.commands.model_info import format_model_info, model_info

    info = model_info(str(ckpt))  # `info` on train mil's output: refused before ("attach it first")
    assert info["kind"] == "mil_head" and info["training_incomplete"] is True and info["epochs"] == 2
    text = format_model_info(info)
    assert "a slide head from `wsi-vssm train mil`" in text and "12 trained it, 4 selected it" in text
    assert "has not finished" in text and f"{F} per cell, of backbone h0" in text
    with pytest.warns(UserWarning):
        train_mil(train, valid, cfg, checkpoint_path=ckpt)  # the whole run: the mark goes
    assert "training_incomplete" not in torch.load(ckpt, weights_only=True)["metadata"]


def test_cli_a_store_whose_last_extract_failed_is_left_out_with_a_warning(feature_bags, tmp_path):
    """A slide replaced and extracted again, failing, kept its earlier store: `train mil` trained on those stale
    features without a word (evaluate and info already set such leftovers apart)."""
    import shutil

    from wsi_vssm.runs.state import write_state

    d, bags = feature_bags
    feat = tmp_path / "feat"
    shutil.copytree(d, feat)
    write_state(feat, "extract", "t00", {"status": "failed", "error": "the file is truncated"})
    write_state(feat, "extract", "n00", {"status": "done"})
    ref = tmp_path / "reference.csv"
    ref.write_text(_reference(bags))
    res = _train_mil_cli(feat, ref, tmp_path / "m.pt")
    assert res.exit_code == 0, res.output
    stale = [line for line in res.stderr.splitlines() if "did not finish" in line]
    assert len(stale) == 1 and "1 feature store(s)" in stale[0] and "t00 (failed)" in stale[0], res.stderr
    assert "11 training and 4 validation slides" in res.stdout  # t00 out, n00 (done) and the rest kept


def test_cli_train_mil_waits_for_no_extract_but_says_one_is_at_work(feature_bags, tmp_path, capsys):
    """`train mil` started while `extract` worked on the same folder left the slide out as "did not finish ...
    extract them again" (a live run was doing just that), or trained on a subset without a word when the store
    was not written yet, or called a store rewritten under it "damaged". It stops now, exit 4, naming the run."""
    import shutil

    from conftest import run_cli_captured

    from wsi_vssm.runs.state import STATE_DIR, SlideLock, write_state

    d, bags = feature_bags
    feat = tmp_path / "feat"
    shutil.copytree(d, feat)
    ref = tmp_path / "reference.csv"
    ref.write_text(_reference(bags))
    (feat / STATE_DIR).mkdir(exist_ok=True)
    for name, status in (("t00", "running"), ("t01", None)):  # rewriting a store; writing one not there yet
        if status:
            write_state(feat, "extract", name, {"status": status})
        else:
            shutil.rmtree(feat / f"{name}.zarr")
        lock = SlideLock(feat, "extract", name)
        assert lock.acquire()
        try:
            code, _, err = run_cli_captured(["train", "mil", "--features", feat, "--labels", ref, "--out",
                                             tmp_path / "m.pt", "--epochs", "1", "--device", "cpu"], capsys)
        finally:
            lock.release()
        assert code == 4 and not (tmp_path / "m.pt").exists(), err
        assert f"1 labelled slide(s) are being extracted now ({name}; locked by another run (pid " in err, err
        assert "wait for that run to finish, then train" in err and err.count("\n") == 1, err
        assert f"{name}.extract.lock: delete it)" in err, err  # a killed run on another host: which file to remove


def test_cli_an_existing_out_is_warned_about_and_the_stop_message_says_what_is_on_disk(feature_bags, tmp_path):
    """A finished head at --out was replaced by a new run's first epoch without a word, and Ctrl-C before any
    epoch ended claimed the --out file held this run's unfinished head."""
    from wsi_vssm.cli import _how_to_go_on
    d, bags = feature_bags
    ref = tmp_path / "reference.csv"
    ref.write_text(_reference(bags))
    res = _train_mil_cli(d, ref, tmp_path / "m.pt")
    assert res.exit_code == 0 and "exists" not in res.stderr, res.output
    res = _train_mil_cli(d, ref, tmp_path / "m.pt")
    warned = [line for line in res.stderr.splitlines() if "exists: this run replaces it" in line]
    assert res.exit_code == 0 and len(warned) == 1 and str(tmp_path / "m.pt") in warned[0], res.stderr
    said = _how_to_go_on(["train", "mil"])
    assert "once an epoch had ended" in said and "a file already there is as it was" in said


def test_stores_of_other_extract_settings_are_warned_about_and_recorded(tmp_path, capsys):
    """Stores extracted at 256 px regions and at 2,048 px were mixed without a word (the same cells' features
    differ, most near region edges: docs/features.md), and the head did not record the settings it was trained
    on."""
    from conftest import run_cli_captured

    train = [(_store(tmp_path / f"a{i}.zarr", i, i % 2 == 1, region_px=2048, overlap_px=128, min_tissue=0.25),
              i % 2) for i in range(4)]
    train.append((_store(tmp_path / "small.zarr", 9, True, region_px=256, overlap_px=128, min_tissue=0.25), 1))
    valid = [(_store(tmp_path / f"v{i}.zarr", 20 + i, i == 1, region_px=2048, overlap_px=128, min_tissue=0.25), i)
             for i in range(2)]
    head = {"weight": torch.full((1, F), 0.5), "bias": torch.tensor([-1.0])}
    ckpt = tmp_path / "mil.pt"
    with pytest.warns(UserWarning) as got:
        train_mil(train, valid, MILTrainConfig(epochs=1), cell_head=head, checkpoint_path=ckpt)
    said = [str(w.message) for w in got if "different region_px" in str(w.message)]
    assert len(said) == 1 and "256 (1, e.g. small.zarr), 2048 (6, e.g. a0.zarr)" in said[0]
    assert not any("different overlap_px" in str(w.message) or "min_tissue" in str(w.message) for w in got)
    features = torch.load(ckpt, weights_only=True)["metadata"]["features"]
    assert features["region_px"] == [256, 2048] and features["overlap_px"] == 128
    code, text, _ = run_cli_captured(["info", ckpt], capsys)
    assert code == 0 and "regions mixed (256, 2048) px, overlap 128 px, min tissue 0.25" in text


def test_slides_without_cells_are_left_out_of_training_and_of_the_split(feature_bags, tmp_path):
    """An empty bag (no tissue) was counted among the training slides (`train_slides`, the summary line) and
    could be drawn into validation by the seeded split, so selection rested on fewer slides than announced."""
    import shutil


    d, bags = feature_bags
    train, valid = _split(bags)
    empty = _store(tmp_path / "blank.zarr", 9, False, n=0)
    head = {"weight": torch.full((1, F), 0.5), "bias": torch.tensor([-1.0])}
    with pytest.warns(UserWarning) as got:
        _, hist = train_mil([*train, (empty, 0)], valid, MILTrainConfig(epochs=1), cell_head=head)
    assert "1 training slide(s) have no cells (no tissue found) and are left out of training: blank" in [
        str(w.message) for w in got]
    assert "blank" not in hist.metadata["train_slides"] and len(hist.metadata["train_slides"]) == len(train)
    feat = tmp_path / "feat"
    shutil.copytree(d, feat)
    shutil.copytree(empty, feat / "blank.zarr")
    ref = tmp_path / "reference.csv"
    ref.write_text(_reference(bags, "blank,0\n"))
    res = _train_mil_cli(feat, ref, tmp_path / "m.pt")
    assert res.exit_code == 0, res.output
    left = [line for line in res.stderr.splitlines() if "hold no cells" in line]
    assert len(left) == 1 and left[0].endswith("left out of training and validation: blank"), res.stderr
    assert "no feature store" not in res.stderr  # it has one: not also called missing
    assert "12 training and 4 validation slides" in res.stdout  # the 16 with cells, split as before
    ref.write_text(_reference(bags))  # blank unlabelled
    res = _train_mil_cli(feat, ref, tmp_path / "m2.pt")
    assert res.exit_code == 0 and "hold no cells" not in res.stderr, res.output  # not trained on: not looked into
    ref.write_text("blank,0\n")  # the only labelled slide's store is left out
    res = _train_mil_cli(feat, ref, tmp_path / "m3.pt")
    assert "the store of every labelled slide is left out" in str(res.exception), res.output


def test_an_attached_ensemble_heads_selection_is_said_per_seed():
    """A model whose head was attached from a `--ensemble` checkpoint said "best epoch None" (the attached head's
    record kept neither its members nor their epochs)."""
    from wsi_vssm.commands.model_info import _attached_head, _where_stopped

    stage = {"method": "attached MIL checkpoint", "checkpoint": "/x/mil.pt", "train_slides": ["a"],
             "valid_slides": ["b"], "best_epoch": None, "epochs": [3, 4],
             "members": [{"seed": 0, "best_epoch": 2}, {"seed": 1, "best_epoch": 4}], "valid_auc": 0.9}
    assert _where_stopped(_attached_head(stage)) == "best epochs per seed 2 of 3, 4 of 4"
    assert _where_stopped({"best_epoch": 5, "epochs": None}) == "best epoch 5"
