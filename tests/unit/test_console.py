"""The driver's console: library INFO lines reach the log file, not the terminal (unless
verbose); warnings still reach the user; the log is kept in the run directory; a progress bar's
rate counts from its first progress."""

from __future__ import annotations

import logging
import sys
import time

import pytest
from tqdm import tqdm

from ray_align import console
from ray_align.storage import RunDir


@pytest.fixture
def library_logger():
    """A logger shaped like Ray's: its own terminal handler, not propagating to the root. The
    handler is made in the test (``terminal``): pytest swaps sys.stderr only for the test call."""
    logger = logging.getLogger("ray.data.unit_test")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    logger.handlers.clear()


def terminal(logger: logging.Logger) -> logging.Logger:
    logger.addHandler(logging.StreamHandler(sys.stderr))
    return logger


def test_library_info_goes_to_the_log_file_and_warnings_to_the_terminal(library_logger, capsys,
                                                                         tmp_path):
    terminal(library_logger)
    driver = console.start(verbose=False)
    library_logger.info("Starting execution of Dataset")
    library_logger.warning("Progress bars disabled. To enable, set ...")  # our own choice
    library_logger.warning("the cluster cannot hold this actor")
    shown = capsys.readouterr().err
    assert "Starting execution" not in shown and "Progress bars disabled" not in shown
    assert "the cluster cannot hold this actor" in shown
    written = driver.log_file.read_text()
    assert "Starting execution of Dataset" in written and "cannot hold" in written
    run = RunDir(str(tmp_path / "run"))
    console.save_log(run)
    (saved,) = run.list_files("logs", suffix=".log")
    assert "Starting execution of Dataset" in run.read_bytes("logs", saved).decode()


def test_verbose_shows_everything(library_logger, capsys):
    terminal(library_logger)
    console.start(verbose=True)
    library_logger.info("Starting execution of Dataset")
    assert "Starting execution of Dataset" in capsys.readouterr().err


def test_a_bars_rate_counts_from_its_first_progress():
    bar = tqdm(total=100, disable=False, file=sys.stderr)
    bar.start_t -= 60  # a minute of engine start-up before the first row came back
    bar.update(10)
    assert bar.format_dict["elapsed"] >= 60
    console.restart_clock(bar)
    time.sleep(0.05)
    assert bar.n == 10 and bar.format_dict["elapsed"] < 5
    bar.close()
