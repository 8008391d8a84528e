"""Augmentation operations, each split into "draw the parameters" (from the view's Generator) and "apply them"
(deterministic, no RNG inside). `geometry`: crop boxes, the pad-crop window, Pillow resizing, flips."""
