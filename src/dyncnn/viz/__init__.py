"""Plots (matplotlib, headless): training curves, accuracy by digit scale, accuracy against MACs, exit
histograms and easy/hard galleries, pixel-mask overlays, glance-and-focus patches, frames and patches of clips."""
from .dynamic_plots import plot_accuracy_vs_macs, plot_easy_hard_gallery, plot_exit_histogram
from .glance_plots import plot_glance_patches
from .plots import plot_accuracy_by_scale, plot_training_curves
from .spatial_plots import plot_mask_overlays, plot_model_masks
from .temporal_plots import plot_focus_strips, plot_frame_usage

__all__ = ["plot_training_curves", "plot_accuracy_by_scale", "plot_accuracy_vs_macs", "plot_exit_histogram",
           "plot_easy_hard_gallery", "plot_glance_patches", "plot_mask_overlays", "plot_model_masks",
           "plot_focus_strips", "plot_frame_usage"]
