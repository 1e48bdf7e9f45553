"""Quiet, library-friendly training output: huggingface_hub progress bars and logging in place of Trainer's
prints, and transformers' load reports silenced where a new reward head is expected.
"""

from __future__ import annotations

import contextlib

from huggingface_hub.utils import logging

logger = logging.get_logger(__name__)


def progress_callback(tqdm_class, desc: str):
    """A Trainer callback drawing huggingface_hub's progress bar and logging the loss (Trainer's own prints)."""
    from transformers import TrainerCallback

    class HubProgressCallback(TrainerCallback):
        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm_class(total=state.max_steps, desc=desc, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                logger.info("%s step %d: loss %.4f", desc, state.global_step, logs["loss"])
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return HubProgressCallback()


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars while loading a base whose head is (expectedly) new.

    The caller checks the loading info itself, so nothing unexpected goes unseen.
    """
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()
