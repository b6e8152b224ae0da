from pathlib import Path

import pytest

from ray_align.config import ConfigError, HttpJudgeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_quickstart_validates():
    config = load_config(QUICKSTART)
    assert config.train.zero_stage == 2 and config.train.num_workers == 2
    assert config.critic is config.model  # the model critiques itself by default, as in the paper


def test_overrides_are_dotted_and_typed():
    config = load_config(QUICKSTART, ["train.epochs=3", "engine.pool=[1, 4]", "run_dir=s3://b/r"])
    assert config.train.epochs == 3 and config.engine.pool == (1, 4) and config.run_dir == "s3://b/r"


def test_engine_env_values_given_as_numbers_become_text():
    # `engine.env.OMP_NUM_THREADS=2` on the command line reads 2 as a number
    config = load_config(QUICKSTART, ["engine.env.OMP_NUM_THREADS=2", "engine.env.FLAG=true",
                                      "engine.env.NAME=x"])
    assert {k: config.engine.env[k] for k in ("OMP_NUM_THREADS", "FLAG", "NAME")} == {
        "OMP_NUM_THREADS": "2", "FLAG": "1", "NAME": "x"}


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


HTTP_JUDGE = ["judge.kind=http",
              "judge.http={url: 'http://127.0.0.1:9/v1/chat/completions', model: judge}"]


def test_http_judge_settings_are_typed_with_their_defaults():
    judge = load_config(QUICKSTART, HTTP_JUDGE).judge
    assert isinstance(judge.http, HttpJudgeConfig)
    assert (judge.http.concurrency, judge.http.api_key_env) == (1, "OPENAI_API_KEY")
    assert load_config(QUICKSTART).judge.http is None


def test_how_the_http_judge_sends_requests_never_redoes_the_judging():
    a = load_config(QUICKSTART, HTTP_JUDGE)
    sent_otherwise = [f"judge.http.{key}" for key in (
        "concurrency=8", "batch_size=2", "max_retries=5", "retry_wait_s=3", "qps=2", "timeout_s=5")]
    b = load_config(QUICKSTART, [*HTTP_JUDGE, *sent_otherwise])
    assert b.judge.http.concurrency == 8 and b.judge.http.qps == 2
    assert a.stage_identity("judge") == b.stage_identity("judge")
    assert a.section_hash("compare", "judge") == b.section_hash("compare", "judge")
    for answers_otherwise in ("model=other", "temperature=0.5", "max_tokens=64",
                              "url=http://elsewhere/v1/chat/completions"):
        c = load_config(QUICKSTART, [*HTTP_JUDGE, f"judge.http.{answers_otherwise}"])
        assert a.stage_identity("judge") != c.stage_identity("judge"), answers_otherwise


def test_the_judge_is_one_top_level_section_not_a_compare_setting():
    assert load_config(QUICKSTART).judge.kind == "offline"
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, ["compare.judge.kind=offline"])
    assert "compare: Value error, compare.judge moved: set the judge in the top-level `judge:` " \
        "section" in str(error.value)


def test_the_reminder_is_a_setting_of_every_method_not_a_method():
    assert load_config(QUICKSTART).compare.reminder == "both"
    assert load_config(QUICKSTART, ["compare.reminder=plain"]).compare.reminder == "plain"
    with pytest.raises(ConfigError, match="compare.reminder: Input should be 'both', 'plain' or"):
        load_config(QUICKSTART, ["compare.reminder=yes"])
    # the old row-as-method name fails before anything runs, saying what to write instead
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, ["compare.methods=[vanilla, mistake_analysis+reminder]"])
    assert ("compare.methods: Value error, 'mistake_analysis+reminder' is a row of the table, not a "
            "method: list mistake_analysis and set compare.reminder (both, the default, asks every "
            "method plainly and with the harmlessness reminder; reminder asks with it only)"
            ) in str(error.value)
    with pytest.raises(ConfigError, match="'vanilla\\+reminder' is a row of the table"):
        load_config(QUICKSTART, ["compare.methods=[vanilla+reminder]"])
    with pytest.raises(ConfigError, match="compare.methods: Value error, lists sft more than once"):
        load_config(QUICKSTART, ["compare.methods=[sft, vanilla, sft]"])


def test_where_training_stages_its_files_never_redoes_training():
    a, b = load_config(QUICKSTART), load_config(QUICKSTART, ["train.scratch_dir=/mnt/scratch"])
    assert (a.train.scratch_dir, b.train.scratch_dir) == (None, "/mnt/scratch")
    assert a.stage_identity("train") == b.stage_identity("train")
    assert a.stage_identity("train") != load_config(QUICKSTART, ["train.lr=0.1"]).stage_identity("train")


@pytest.mark.parametrize(("steps", "message"), [
    ([], "at least one"), ([0, 4], ">= 1"), ([8, 4], "increasing order"), ([4, 4], "each once")])
def test_learning_curve_steps_are_increasing_positive_counts(steps, message):
    from ray_align.config import CompareConfig, TrainConfig

    with pytest.raises(ValueError, match=message):
        CompareConfig(steps=steps)
    with pytest.raises(ValueError, match=message):
        TrainConfig(export_at_steps=steps)
    assert CompareConfig(steps=[14, 28]).steps == [14, 28]


def test_unset_curve_settings_leave_finished_stages_as_they_were():
    """Fields added for the learning curve stay out of the identity while unset: upgrading
    redoes no finished training or judging."""
    from ray_align.config import CompareConfig, TrainConfig

    assert "export_at_steps" not in TrainConfig().identity()
    assert "steps" not in CompareConfig().identity()
    assert TrainConfig(export_at_steps=[2]).identity()["export_at_steps"] == [2]
