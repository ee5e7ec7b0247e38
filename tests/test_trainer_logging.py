"""MetricsLogger and conversion progress: the redacted, resolved config reaches wandb (a fake
wandb module in sys.modules), and tqdm bars appear on a terminal and stay out of batch logs."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from sapo_megatron.checkpoint.convert import progress
from sapo_megatron.config import config_to_dict, load_config, redact
from sapo_megatron.trainer.logging import MetricsLogger

SECRET = "hf_abcdefghijklmnopqrstuvwx"


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished += 1


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class BatchLog(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_the_resolved_config_with_secrets_redacted(tmp_path, fake_wandb):
    cfg = load_config(None, [f"task.options.hf_token={SECRET}", "task.options.endpoint=https://u:pw@example.com/v1",
                             "seed=7", f"output_dir={tmp_path}"])
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress=False, wandb_project="proj",
                           wandb_entity="team", config=cfg)
    logger.log({"step": 0, "reward_mean": 0.25})
    logger.close()

    (init,) = fake_wandb.inits
    assert init["project"] == "proj" and init["entity"] == "team" and init["dir"] == str(tmp_path)
    sent = init["config"]
    assert sent == redact(config_to_dict(cfg, resolved=True))
    assert sent["run"]["seed"] == 7 and sent["run"]["output_dir"] == str(tmp_path)
    assert sent["task"]["options"]["hf_token"] == "<redacted>"
    assert sent["task"]["options"]["endpoint"] == "https://u:<redacted>@example.com/v1"
    # Not vacuous: the secret was in the config we passed, and appears nowhere wandb saw.
    assert cfg.task.options["hf_token"] == SECRET and SECRET not in json.dumps(sent)
    assert fake_wandb.logged == [(0, {"step": 0, "reward_mean": 0.25})] and fake_wandb.finished == 1


def test_wandb_config_from_a_plain_mapping_is_redacted_too(tmp_path, fake_wandb):
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb_project="p",
                  config={"rollout": {"api_key": "sk-ABCDEFGHIJKLMNOPQRSTU"}, "lr": 1e-6}).close()
    assert fake_wandb.inits[0]["config"] == {"rollout": {"api_key": "<redacted>"}, "lr": 1e-6}


def test_no_wandb_without_a_project_or_on_other_ranks(tmp_path, fake_wandb):
    MetricsLogger(tmp_path / "a", enabled=True, tensorboard=False, config={"x": 1}).close()
    MetricsLogger(tmp_path / "b", enabled=False, wandb_project="p", config={"x": 1}).close()
    assert fake_wandb.inits == []


@pytest.mark.parametrize("stream, shown", [(Terminal, True), (BatchLog, False)])
def test_phase_bar_only_on_a_terminal(tmp_path, monkeypatch, stream, shown):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress=True)
    with logger.phase("updates", 4) as advance:
        for _ in range(4):
            advance()
    logger.close()
    # leave=False: the bar is drawn (0/4 at least; tqdm rate-limits redraws) and wiped on close.
    assert ("updates" in err.getvalue() and "/4" in err.getvalue()) is shown
    if not shown:
        assert err.getvalue() == ""


def test_phase_is_silent_with_progress_off_and_on_other_ranks(tmp_path, monkeypatch):
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    for logger in (MetricsLogger(tmp_path / "a", enabled=True, tensorboard=False, progress=False),
                   MetricsLogger(tmp_path / "b", enabled=False)):
        with logger.phase("rollout", 1) as advance:
            advance()
        logger.close()
    assert err.getvalue() == ""


@pytest.mark.parametrize("stream, enabled, shown", [(Terminal, True, True), (BatchLog, True, False),
                                                    (Terminal, False, False)])
def test_conversion_bar(monkeypatch, stream, enabled, shown):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress(3, "hf-to-mcore", enabled)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert ("hf-to-mcore" in err.getvalue() and "3/3" in err.getvalue()) is shown
    if not shown:
        assert err.getvalue() == ""
