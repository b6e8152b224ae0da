import torch

from ray_align.bench.gpu import SHAPES, parameter_count, peak_tflops, random_model


def test_parameter_count_matches_the_built_model_and_tinyllama():
    model = random_model("smoke", "cpu")
    assert parameter_count("smoke") == sum(p.numel() for p in model.parameters())
    assert parameter_count("tinyllama-1.1b") == 1_100_048_384  # TinyLlama-1.1B's own count
    assert set(SHAPES) == {"smoke", "tinyllama-1.1b"}


def test_peak_flops_is_given_or_known_from_the_card():
    assert peak_tflops(500.0) == 500.0
    if not torch.cuda.is_available():
        assert peak_tflops(None) is None  # no GPU: no MFU rather than a made-up one
