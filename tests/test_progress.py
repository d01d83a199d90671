"""Progress bars: unchanged tqdm on a terminal; whole lines at most every 30 s elsewhere (CI logs,
Ray workers, `> log 2>&1`), and the final state."""
import io
import os
import subprocess
import sys

import pytest

from attnc import _progress
from attnc._progress import LOG_INTERVAL_S, LogBar, progress_bar


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(LogBar, "clock", staticmethod(c))
    return c


def test_log_lines_at_most_every_interval_and_the_final_state(clock):
    out = io.StringIO()
    bar = progress_bar(total=100, desc="train mlm", unit="step", file=out)
    assert isinstance(bar, LogBar)
    for step in range(1, 91):          # 90 steps, one a second
        clock.t += 1.0
        bar.update(1)
        bar.set_postfix(loss=f"{6 - step / 100:.3f}")      # set_postfix refreshes: still paced
    clock.t += 0.5
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the start, t = 30, 60, 90 s, and the close
    assert len(lines) == 5, lines
    assert lines[0].startswith("train mlm:   0%") and " 0/100" in lines[0]
    assert [line.split("|")[2].split()[0] for line in lines[1:4]] == ["30/100", "60/100", "90/100"]
    assert " 90/100" in lines[4] and "loss=5.100" in lines[4]
    bar.close()                          # a second close writes nothing
    assert out.getvalue() == text


def test_a_bar_closed_early_still_writes_its_final_state(clock):
    out = io.StringIO()
    with progress_bar(total=10, initial=4, desc="search opnas", unit="eval", file=out) as bar:
        clock.t += 1
        bar.update(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and " 4/10" in lines[0] and " 6/10" in lines[1]


def test_disabled_bar_writes_nothing(clock):
    out = io.StringIO()
    bar = progress_bar(total=10, file=out, disable=True)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


def test_terminal_gets_tqdms_own_bar():
    out = _Terminal()
    bar = progress_bar(total=5, desc="latency cpu", file=out, mininterval=0)
    assert not isinstance(bar, LogBar)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in out.getvalue()         # redrawn in place, as tqdm does


def test_default_pace_is_thirty_seconds():
    assert LOG_INTERVAL_S == 30.0
    assert progress_bar(total=1, file=io.StringIO())._interval == 30.0


def test_redirected_training_writes_lines(tmp_path):
    """End to end: a tiny MLM run with its bar on, stderr sent to a file as `2> log` would."""
    code = (
        "import torch\n"
        "from attnc.runtime import AttncBertForMaskedLM, resolve_config\n"
        "from attnc.runtime import data as D\n"
        "from attnc.runtime.trainer import MLMData, TrainConfig, train\n"
        "tok = D.load_tokenizer()\n"
        "torch.manual_seed(0)\n"
        "model = AttncBertForMaskedLM(resolve_config('2-32-64-2-32', vocab_size=len(tok), pad_token_id=tok.pad_token_id))\n"
        "blocks = torch.randint(5, len(tok), (64, 16))\n"
        "train(model, MLMData(blocks, tok), TrainConfig(steps=12, batch_size=4, progress=True, device='cpu'))\n"
    )
    log = tmp_path / "log"
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, "-c", code], stderr=err, stdout=subprocess.PIPE, text=True,
                           timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text
    bar_lines = [line for line in text.splitlines() if line.startswith("train mlm")]
    assert len(bar_lines) == 2, text          # the start and the end: the run takes under 30 s
    assert "12/12" in bar_lines[-1] and "0/12" in bar_lines[0]


@pytest.mark.parametrize("terminal", [False, True])
def test_cli_switches_off_hugging_face_bars_only_off_a_terminal(tmp_path, terminal):
    """transformers' own bars (saving shards) redraw with carriage returns: off a terminal the CLI
    turns them off, for itself and the processes it starts; on a terminal they stay."""
    import pty
    code = ("import os, sys\n"
            "from attnc.cli import _quiet_foreign_bars\n"
            "_quiet_foreign_bars()\n"
            "from transformers.utils import logging\n"
            "import datasets\n"
            "print(logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),\n"
            "      os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    if terminal:
        master, slave = pty.openpty()
        try:
            r = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.PIPE,
                               text=True, timeout=120, env=env)
        finally:
            os.close(slave)
            os.close(master)
    else:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == (["True", "True", "None"] if terminal else ["False", "False", "1"])
