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


def test_the_benchmark_feeds_packed_batches_of_real_tokens_and_counts_attention():
    from ray_align.bench.gpu import attention_flops, packed_batches, row_lengths
    from ray_align.training.core import real_tokens

    lengths = [n for n, _ in row_lengths(2000, 2048, seed=0)]
    assert 250 < sorted(lengths)[1000] < 400 and max(lengths) == 2048 and min(lengths) >= 16
    spec = {"micro_batch": 4, "seq_len": 512, "warmup": 1, "steps": 3, "seed": 0, "shape": "smoke"}
    batches = list(packed_batches(spec, vocab=512))
    assert len(batches) == 4
    for batch in batches:
        assert batch["input_ids"].shape[0] <= 4 and batch["input_ids"].shape[1] <= 512
        assert real_tokens(batch) == int(batch["sample_lengths"].sum()) <= 4 * 512
        sizes = batch["sample_lengths"].tolist()
        assert attention_flops(batch, "smoke") == 12 * 2 * 64 * sum(n * n for n in sizes)


def test_the_gpu_check_names_its_file_after_the_card():
    from ray_align.bench.gpu_check import card_name, default_attention

    if not torch.cuda.is_available():
        assert card_name() == "cpu"
    assert default_attention() in ("sdpa", "flash_attention_2")
