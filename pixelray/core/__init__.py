"""The numerics: pixel-change specs, counter-based draws, the perturbation engine, corruptions, metrics.

Nothing here imports Ray or does I/O: every function is a pure function of its tensors and specs,
so the sweep's workers, the fine-tune's loop and the tests all run the very same code.
"""
