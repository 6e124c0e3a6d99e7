import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    """Tests run in float64 unless they say otherwise: exactness checks need the precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_worker_processes():
    """The suite must leave no energy worker behind (processes started by this pytest)."""
    import os
    import subprocess
    import time

    yield
    time.sleep(0.2)
    found = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "p4bg.energy.worker"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert not found, f"energy worker processes left behind: {found}"


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A tiny MD dataset (2 replicas x 0.02 ns, 200 frames) shared by the CLI tests."""
    from p4bg.simulate import main as simulate_main

    out = tmp_path_factory.mktemp("md") / "ala"
    simulate_main(["--ns", "0.04", "--replicas", "2", "--chunk-frames", "100", "--equilibration-ps",
                   "1", "--no-progress", "--out", str(out)])  # fmt: skip
    return out
