"""Killed trainings of the DiTs trained here resume (tide_core/train_state.py): a run interrupted after its
last save and started again ends with the weights and loss log of a run that was never interrupted."""

from __future__ import annotations

import pytest
import torch

from tide_core.config import DigitsDiTConfig
from tide_core.config.model import StyledDigitsConfig
from tide_core.digits import load_digits
from tide_core.train_dit import train_digits_dit
from tide_core.train_state import resume_path
from tide_core.train_styled import train_and_save as train_styled

DIGITS = DigitsDiTConfig(num_layers=2, num_heads=2, head_dim=16, train_steps=7, batch_size=8, warmup_steps=2,
                         resume_every=3)
STYLED = StyledDigitsConfig(image_size=8, patch_size=2, num_layers=2, num_heads=2, head_dim=8, text_width=16,
                            text_layers=1, train_steps=7, batch_size=4, warmup_steps=1, resume_every=3)


class Killed(Exception):
    """Stands for SIGKILL: raised from the progress callback, so nothing after that step runs."""


def kill_at(step: int):
    def progress(s: int, loss: float, lr: float) -> None:
        if s == step:
            raise Killed
    return progress


def _logged(lines: list[str]):
    return lambda line: lines.append(line)


def test_a_killed_digits_training_resumes_to_the_unbroken_weights(tmp_path):
    whole = train_digits_dit(DIGITS, load_digits(16), log_every=1)
    out = tmp_path / "digits"
    with pytest.raises(Killed):
        train_digits_dit(DIGITS, load_digits(16), progress=kill_at(5), log_every=1, resume=resume_path(out))
    assert torch.load(resume_path(out), weights_only=True)["step"] == 3  # saved after step 3, killed at 5
    lines: list[str] = []
    resumed = train_digits_dit(DIGITS, load_digits(16), log_every=1, resume=resume_path(out), log=_logged(lines))
    assert lines == [f"resuming from step 3 ({resume_path(out)})"]
    assert resumed.meta["weights_sha256"] == whole.meta["weights_sha256"]
    assert resumed.losses == whole.losses and resumed.loss_steps == list(range(1, 8))


def test_a_killed_styled_training_resumes_and_the_state_goes_once_saved(tmp_path):
    """The styled loop draws from numpy (batches, styles, captions), a torch generator (timesteps, noise) and
    torch's global generator (the T5 encoder's dropout): all three are put back."""
    out = tmp_path / "styled"
    whole = train_styled(STYLED, tmp_path / "whole")
    assert not resume_path(tmp_path / "whole").exists()
    with pytest.raises(Killed):
        train_styled(STYLED, out, progress=kill_at(7))  # logs every 50 steps, so only the last step reports
    assert not out.exists() and torch.load(resume_path(out), weights_only=True)["step"] == 6
    lines: list[str] = []
    resumed = train_styled(STYLED, out, log=_logged(lines))
    assert lines == [f"resuming from step 6 ({resume_path(out)})"]
    assert resumed.meta["weights_sha256"] == whole.meta["weights_sha256"]
    assert resumed.meta["loss_curve"] == whole.meta["loss_curve"]
    encoders = [torch.cat([p.flatten() for p in r.text_encoder.parameters()]) for r in (whole, resumed)]
    torch.testing.assert_close(encoders[0], encoders[1], rtol=0, atol=0)
    assert out.is_dir() and not resume_path(out).exists()


def test_a_state_of_another_recipe_is_not_resumed(tmp_path):
    out = tmp_path / "digits"
    with pytest.raises(Killed):
        train_digits_dit(DIGITS, load_digits(16), progress=kill_at(4), log_every=1, resume=resume_path(out))
    other = DIGITS.model_copy(update={"seed": 1})
    lines: list[str] = []
    fresh = train_digits_dit(other, load_digits(16), log_every=1, resume=resume_path(out), log=_logged(lines))
    assert lines == [f"{resume_path(out)} holds another recipe ({DIGITS.fingerprint()} != {other.fingerprint()}): "
                     "starting over"]
    assert fresh.meta["weights_sha256"] == train_digits_dit(other, load_digits(16)).meta["weights_sha256"]
    assert DIGITS.model_copy(update={"resume_every": 50}).fingerprint() == DIGITS.fingerprint()
