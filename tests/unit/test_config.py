from pathlib import Path

from ray_align.config import load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_quickstart_validates():
    config = load_config(QUICKSTART)
    assert config.train.zero_stage == 2 and config.train.num_workers == 2
    assert config.critic is config.model  # the model critiques itself by default, as in the paper


def test_overrides_are_dotted_and_typed():
    config = load_config(QUICKSTART, ["train.epochs=3", "engine.pool=[1, 4]", "run_dir=s3://b/r"])
    assert config.train.epochs == 3 and config.engine.pool == (1, 4) and config.run_dir == "s3://b/r"


def test_section_hash_tracks_only_its_sections():
    a = load_config(QUICKSTART)
    b = load_config(QUICKSTART, ["train.epochs=5"])
    assert a.section_hash("induce", "model") == b.section_hash("induce", "model")
    assert a.section_hash("train") != b.section_hash("train")


def test_section_hash_takes_dotted_sections():
    a = load_config(QUICKSTART)
    b = load_config(QUICKSTART, ["data.helpful.limit=3"])
    assert a.section_hash("data.harmful") == b.section_hash("data.harmful")
    assert a.section_hash("data.helpful") != b.section_hash("data.helpful")


def test_every_shipped_config_validates():
    for path in (REPO / "configs").glob("*.yaml"):
        assert load_config(path).run_dir, path
