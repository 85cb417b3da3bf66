"""Shared fixtures: every test writes its artifacts under a temporary output root."""
import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path, monkeypatch):
    """model/ and results/ of anything a test runs go to tmp_path (artifacts.output_root)."""
    monkeypatch.setenv("PIPELINE_OUTPUT_ROOT", str(tmp_path / "out"))
    torch.set_num_threads(2)
    yield tmp_path / "out"
