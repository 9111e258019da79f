"""The plots a reader sees without the code: markers for short runs, named losses, label vs prediction."""
import matplotlib.image as mpimg
import torch

import dyncnn.viz.dynamic_plots as dynamic_plots
import dyncnn.viz.plots as plots
from dyncnn.viz import plot_easy_hard_gallery, plot_training_curves


def test_one_epoch_training_plot_is_not_empty(tmp_path, monkeypatch):
    history = [{"epoch": 1, "train_loss": 11.5, "train_acc": 0.3, "val_loss": 9.0, "val_acc": 0.4}]
    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    path = plot_training_curves(history, tmp_path / "training.png", loss_label="loss: sum over the 5 exits")
    ax_loss, ax_acc = figs[0].axes
    assert ax_loss.get_ylabel() == "loss: sum over the 5 exits" and ax_acc.get_ylabel() == "accuracy (%)"
    assert all(line.get_marker() == "o" for ax in (ax_loss, ax_acc) for line in ax.get_lines())
    img = mpimg.imread(path)[..., :3]
    blue = (img[..., 2] > 0.6) & (img[..., 0] < 0.3)        # matplotlib's first colour, the train markers
    orange = (img[..., 0] > 0.9) & (img[..., 2] < 0.2)      # the second, the validation markers
    assert blue.sum() > 20 and orange.sum() > 20


def test_gallery_says_label_and_prediction(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(dynamic_plots, "_save", lambda fig, path: figs.append(fig) or path)
    images = torch.rand(6, 1, 16, 16)
    exit_index = torch.tensor([0, 0, 0, 2, 2, 2])
    plot_easy_hard_gallery(images, [1, 2, 3, 4, 5, 6], exit_index, tmp_path / "g.png", per_row=3,
                           predictions=[1, 2, 9, 4, 5, 6])
    fig = figs[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "label 1\npred. 1" and "label 3\npred. 9" in titles
    wrong = [ax for ax in fig.axes if ax.get_title() == "label 3\npred. 9"][0]
    assert wrong.title.get_color() == "red"
    assert "true label" in fig._suptitle.get_text() and "prediction" in fig._suptitle.get_text()
