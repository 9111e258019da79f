import pytest
import torch
import torch.nn.functional as F

import dyncnn
from dyncnn.dynamic.width import distillation_loss
from dyncnn.train import TrainConfig, Trainer
from dyncnn.train.distill import Distillation


def _net(seed, widths=(8, 16)):
    torch.manual_seed(seed)
    return dyncnn.create_model("tiny_mobilenet", widths=widths, in_chans=1)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 10)


def test_the_loss_mixes_cross_entropy_and_the_eval_teachers_soft_targets():
    student, teacher = _net(0).train(), _net(1).train()     # the teacher is evaluated in eval mode whatever its mode
    x, y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    with Distillation(student, teacher, weight=0.3, temperature=2.0, label_smoothing=0.1) as kd:
        out = student(x)
        got = kd.loss(out, y)
    t = teacher.eval()(x)
    want = 0.7 * F.cross_entropy(out, y, label_smoothing=0.1) + 0.3 * distillation_loss(out, t, 2.0)
    assert torch.allclose(got, want, atol=1e-6)
    assert teacher.training is False and kd.teacher_images == 6
    # the gradient reaches the student only
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_evaluation_forwards_skip_the_teacher_and_the_loss_is_cross_entropy():
    student, teacher = _net(0), _net(1)
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([1, 2, 3, 4])
    with Distillation(student, teacher, label_smoothing=0.05) as kd:
        student.eval()
        out = student(x)
        assert torch.equal(kd.loss(out, y), F.cross_entropy(out, y, label_smoothing=0.05))
        assert kd.teacher_images == 0
    # the hook is gone with the context: a training forward afterwards runs no teacher
    student.train()(x)
    assert kd.teacher_images == 0 and not student._forward_hooks


def test_a_loss_without_its_training_forward_is_refused_and_settings_are_checked():
    student, teacher = _net(0).train(), _net(1)
    with Distillation(student, teacher) as kd:
        out = student(torch.rand(2, 1, 16, 16))
        kd.loss(out, torch.tensor([0, 1]))
        with pytest.raises(RuntimeError, match="training forward"):
            kd.loss(out, torch.tensor([0, 1]))           # the teacher's logits are used once
    for kw in ({"weight": 0}, {"weight": 1.5}, {"temperature": 0}):
        with pytest.raises(ValueError, match="weight|temperature"):
            Distillation(student, teacher, **kw)
    with pytest.raises(ValueError, match="another network"):
        Distillation(student, student)


class _Scaled(torch.nn.Module):
    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x):
        return self.net(x) * self.factor


def test_trainer_with_distillation_moves_the_student_towards_the_teacher(tmp_path):
    """Weight 1: the student learns the teacher's outputs, labels ignored; trained on labels that disagree
    with the teacher everywhere, its outputs end closer to the teacher's than at the start, and than the same
    student's trained on those labels."""
    train = _data(96)
    teacher = _net(1, widths=(16, 32)).eval()
    x = train.tensors[0]
    with torch.no_grad():
        t_logits = teacher(x) * 3                     # sharper targets than a fresh network's
    wrong = torch.utils.data.TensorDataset(x, (t_logits.argmax(1) + 1) % 10)
    sharp = _Scaled(teacher, 3.0)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, progress=False, channels_last=True)
    plain, distilled = _net(0), _net(0)

    def gap(m):
        with torch.no_grad():
            return float(distillation_loss(m.eval()(x), t_logits, 1.0))
    start = gap(_net(0))
    Trainer(plain, wrong, None, cfg).fit()
    with Distillation(distilled, sharp, weight=1.0, temperature=1.0) as kd:
        Trainer(distilled, wrong, None, cfg, out_dir=tmp_path, loss_fn=kd.loss).fit()
    assert kd.teacher_images == 4 * 96                        # every image of every training batch, 4 epochs
    assert gap(distilled) < start and gap(distilled) < 0.5 * gap(plain), (start, gap(distilled), gap(plain))
    # the checkpoint holds the student's own parameters (no teacher inside)
    from dyncnn.train.checkpoint import read_checkpoint
    state, _ = read_checkpoint(tmp_path / "last.safetensors")
    assert {k[len("model."):] for k in state if k.startswith("model.")} == set(distilled.state_dict())
    assert not any("teacher" in k or k.startswith("model.net.") for k in state)


def test_the_cache_runs_the_teacher_once_per_image_and_trains_the_same_student(tmp_path):
    train, teacher = _data(80), _net(1)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, progress=False, channels_last=True)
    nets, images = {}, []
    for cache in (False, True):
        nets[cache] = _net(0)
        with Distillation(nets[cache], teacher, weight=0.5, temperature=2.0, cache=cache) as kd:
            Trainer(nets[cache], train, None, cfg, loss_fn=kd.loss).fit()
        images.append(kd.teacher_images)
    # 3 epochs of 2 full batches of 32 (the last part-batch dropped) without; each of the 80 images at most once with
    assert images[0] == 3 * 64 and 64 <= images[1] <= 80
    for (k, a), b in zip(nets[False].state_dict().items(), nets[True].state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4, msg=k)
