"""The fine-tune: augmentation, the data plan, the Ray Train loop and its driver, and a plain in-process fit."""
