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
