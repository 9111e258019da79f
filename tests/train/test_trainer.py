import json

import pytest
import torch
from torch.utils.data import Subset

import dyncnn
from dyncnn.data import MNISTDigits, ScaledMNIST
from dyncnn.data.stored import StoredBatch
from dyncnn.errors import CheckpointError, DyncnnError
from dyncnn.train import TrainConfig, Trainer, load_checkpoint, save_checkpoint
from dyncnn.train import trainer as trainer_module
from dyncnn.train.checkpoint import read_checkpoint
from dyncnn.train.trainer import epoch_batches


@pytest.fixture(scope="module")
def data():
    return Subset(MNISTDigits("train"), range(160)), Subset(MNISTDigits("val"), range(64))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return dyncnn.create_model("tiny_mobilenet", widths=(8, 16), drop_rate=0.2, **kw)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 0.05, "progress": False, **kw})


class Interrupt(Exception):
    pass


def test_training_learns_and_writes_metrics(tmp_path, data):
    train, val = data
    result = Trainer(_model(), train, val, _cfg(epochs=4, lr=0.1), out_dir=tmp_path).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert result.steps == 4 * (160 // 32)
    for name in ("last", "best"):
        assert (tmp_path / f"{name}.safetensors").exists()
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert meta["model"]["name"] == "tiny_mobilenet"
    assert not list(tmp_path.glob(".*tmp"))          # no temporary files left behind


def test_resume_after_epoch_equals_uninterrupted(tmp_path, data):
    train, val = data
    ref = _model()
    Trainer(ref, train, val, _cfg(), out_dir=tmp_path / "ref").fit()

    def stop_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(_model(), train, val, _cfg(), out_dir=tmp_path / "run", callbacks=[stop_after_first_epoch]).fit()
    resumed = _model(seed=123)                        # a different init: everything must come from the checkpoint
    result = Trainer(resumed, train, val, _cfg(), out_dir=tmp_path / "run").fit(resume=True)
    assert result.steps == 3 * 5
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, data):
    train, val = data
    ref = _model()
    Trainer(ref, train, val, _cfg(), out_dir=tmp_path / "ref").fit()

    model = _model()
    calls = []

    def set_progress(fraction):                       # the trainer's per-step hook, used here to interrupt
        calls.append(fraction)
        if len(calls) == 8:                           # step 7 = in the middle of epoch 2
            raise Interrupt
    model.set_progress = set_progress
    with pytest.raises(Interrupt):
        Trainer(model, train, val, _cfg(save_every_steps=2), out_dir=tmp_path / "run").fit()
    assert calls[:3] == [0.0, 1 / 15, 2 / 15]
    assert read_checkpoint(tmp_path / "run" / "last.safetensors")[1]["train_state"]["step"] == 6
    resumed = _model(seed=5)
    Trainer(resumed, train, val, _cfg(save_every_steps=2), out_dir=tmp_path / "run").fit(resume=True)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_with_other_settings_is_refused(tmp_path, data):
    train, val = data
    Trainer(_model(), train, val, _cfg(epochs=1), out_dir=tmp_path).fit()
    with pytest.raises(DyncnnError, match="batch_size=32.*batch_size=16"):
        Trainer(_model(), train, val, _cfg(epochs=1, batch_size=16), out_dir=tmp_path).fit(resume=True)


def test_regularization_loss_is_added(data):
    train, _ = data
    plain, regularized = _model(), _model()
    regularized.regularization_loss = lambda: 10.0 * regularized.fc.weight.pow(2).sum()
    Trainer(plain, train, None, _cfg(epochs=1)).fit()
    Trainer(regularized, train, None, _cfg(epochs=1)).fit()
    # the extra term pulled the classifier weights towards zero
    assert regularized.fc.weight.norm() < 0.5 * plain.fc.weight.norm()


def test_model_training_loss_replaces_the_loss_in_training_only(data):
    train, val = data
    model = _model()
    seen = []

    def training_loss(outputs, target):
        seen.append(target.shape[0])
        return 0.0 * outputs.sum() + 7.0     # constant objective: no learning signal
    model.training_loss = training_loss
    result = Trainer(model, train, val, _cfg(epochs=1)).fit()
    assert seen == [32] * (160 // 32)
    assert result.history[0]["train_loss"] == pytest.approx(7.0)
    assert result.history[0]["val_loss"] != pytest.approx(7.0)   # validation keeps cross-entropy


def test_non_finite_loss_stops_with_message(data):
    train, _ = data
    model = _model()
    model.regularization_loss = lambda: torch.tensor(float("nan"))
    with pytest.raises(DyncnnError, match="loss became nan at step 0"):
        Trainer(model, train, None, _cfg(epochs=1)).fit()


def test_checkpoint_roundtrip_and_rebuild(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "c.safetensors", model, train_state={"step": 3})
    rebuilt, meta = load_checkpoint(path)
    assert meta["train_state"]["step"] == 3
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_of_another_model_is_refused_and_model_untouched(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _model())
    other = dyncnn.create_model("tiny_mobilenet", widths=(8, 16, 32))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="unexpected keys|missing keys") as err:
        load_checkpoint(path, other)
    assert "stages.2" in str(err.value)               # names the keys that differ
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(CheckpointError, match="is of model 'tiny_mobilenet'.*'_ckpt_other'"):
        model = torch.nn.Linear(2, 2)
        model.dyncnn_spec = {"name": "_ckpt_other", "cfg": {}}
        load_checkpoint(path, model)


def test_truncated_or_missing_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.safetensors", _model(), train_state={"step": 1})
    import dyncnn.train.checkpoint as ck

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _model(), train_state={"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["train_state"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.safetensors"]


def test_config_validation(data):
    with pytest.raises(ValueError, match="optimizer must be"):
        TrainConfig(optimizer="adam")
    with pytest.raises(DyncnnError, match="fewer than one batch"):
        Trainer(_model(), Subset(data[0], range(10)), None, _cfg())


def test_progress_off_a_terminal_and_finished_run_says_nothing_to_resume(tmp_path, data, capsys):
    """stderr is not a terminal under pytest: no bar fragments ("\\r"), only the per-epoch lines on stdout."""
    train, val = data
    Trainer(_model(), train, val, _cfg(epochs=1, progress=True), out_dir=tmp_path).fit()
    cap = capsys.readouterr()
    assert "\r" not in cap.err and "\r" not in cap.out and cap.out.startswith("epoch   1/1")
    result = Trainer(_model(), train, val, _cfg(epochs=1, progress=True), out_dir=tmp_path).fit(resume=True)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "finished its 1 epoch (5 steps): nothing to resume" in out
    assert result.steps == 5


def test_channels_last_trains_the_same_model_in_nhwc_and_hands_it_back_in_the_default_format():
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.rand(96, 3, 16, 16, generator=g), torch.arange(96) % 10)
    seen = []
    ref, nhwc = _model(in_chans=3), _model(in_chans=3)
    nhwc.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    Trainer(ref, train, None, _cfg(epochs=1)).fit()
    Trainer(nhwc, train, None, _cfg(epochs=1, channels_last=True)).fit()
    assert len(seen) == 3 and all(seen)                 # every training batch reached the model in NHWC
    for (k, a), b in zip(ref.state_dict().items(), nhwc.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), k
        assert b.is_contiguous(), k                     # the default memory format again


def test_compile_routes_the_training_forward_through_torch_compile(data, monkeypatch):
    train, _ = data
    compiled = []

    def fake_compile(module):                           # what torch.compile returns: a callable module wrapper
        compiled.append(module)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _model()
    Trainer(model, train, None, _cfg(epochs=1)).fit()
    assert compiled == []
    Trainer(model, train, None, _cfg(epochs=1, compile=True)).fit()
    assert compiled == [model]


class _OneByOne(torch.utils.data.Dataset):
    """A dataset's samples without its batched fetch: the DataLoader asks for them one at a time."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


@pytest.fixture(scope="module")
def scaled():
    return Subset(ScaledMNIST("val", canvas=32, clutter=1), range(10, 58))      # 48 samples, 3 batches of 16


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_gathered_at_once_equal_the_samples_one_by_one(scaled, workers, monkeypatch):
    collated = []
    stack = trainer_module.stack_samples
    monkeypatch.setattr(trainer_module, "stack_samples", lambda items: collated.append(type(items)) or stack(items))
    cfg = _cfg(epochs=1, batch_size=16, num_workers=workers)
    batches = epoch_batches(len(scaled), 16, seed=0, epoch=0)
    gathered = list(Trainer(_model(), scaled, None, cfg)._loader(batches, 0))
    one_by_one = list(Trainer(_model(), _OneByOne(scaled), None, cfg)._loader(batches, 0))
    if workers == 0:                                     # (a worker process collates out of sight)
        assert collated == [StoredBatch] * 3 + [list] * 3
    assert len(gathered) == len(one_by_one) == 3
    for (x, y), (x1, y1), idx in zip(gathered, one_by_one, batches):
        for a, b in ((x, x1), (y, y1)):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b)
        assert torch.equal(x, scaled.dataset.images[[10 + i for i in idx]].float() / 255)   # in the sampler's order


def test_training_on_gathered_batches_equals_training_on_samples_one_by_one(scaled):
    runs = []
    for ds in (scaled, _OneByOne(scaled)):
        model = _model()
        history = Trainer(model, ds, None, _cfg(epochs=2, batch_size=16)).fit().history
        runs.append((model, [(h["train_loss"], h["train_acc"]) for h in history]))
    (gathered, curve), (one_by_one, ref_curve) = runs
    assert curve == ref_curve and len(curve) == 2
    for (k, a), b in zip(gathered.state_dict().items(), one_by_one.state_dict().values()):
        assert torch.equal(a, b), k
