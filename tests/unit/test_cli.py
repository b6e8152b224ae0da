import pytest

from ray_align.cli import build_parser, main, parse
from tests.unit.test_config import QUICKSTART


@pytest.mark.parametrize(
    "argv", [[], ["run"], ["stage"], ["check"], ["assets"], ["submit"], ["status"], ["logs"],
             ["bench"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: ray-align" in capsys.readouterr().out


def test_the_cli_offers_the_registered_pipeline_each_stage_after_its_inputs():
    from ray_align.stages import PIPELINE, STAGES

    stage_choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["stage"]._actions
                         if a.dest == "name").choices
    assert list(stage_choices) == list(PIPELINE)
    for position, name in enumerate(PIPELINE):
        assert STAGES[name].name == name
        assert all(PIPELINE.index(upstream) < position for upstream in STAGES[name].inputs)


def test_config_errors_exit_2_before_ray_starts(capsys, tmp_path):
    assert main(["check", str(QUICKSTART), "train.zero_stage=9"]) == 2
    assert "train.zero_stage" in capsys.readouterr().err
    assert main(["run", str(QUICKSTART), f"model.path={tmp_path}"]) == 2
    assert "model.path" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["run", str(QUICKSTART), f"model.path={tmp_path}"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_submitted_config_path_is_relative_to_the_uploaded_checkout(tmp_path):
    from ray_align.submit import job_path

    (tmp_path / "configs").mkdir()
    inside = tmp_path / "configs" / "a.yaml"
    assert job_path(str(inside), tmp_path) == "configs/a.yaml"
    outside = tmp_path.parent / "elsewhere.yaml"
    assert job_path(str(outside), tmp_path) == str(outside.resolve())


def test_submit_copies_only_named_env_vars_and_refuses_missing_ones(monkeypatch, tmp_path):
    from ray_align.submit import runtime_env

    monkeypatch.setenv("HF_TOKEN", "secret-value")
    monkeypatch.setenv("OTHER", "not sent")
    env = runtime_env(["HF_TOKEN"], [], tmp_path)
    assert env["env_vars"] == {"HF_TOKEN": "secret-value"}
    with pytest.raises(ValueError, match="NOT_SET"):
        runtime_env(["NOT_SET"], [], tmp_path)


def test_submitted_command_line_parses_as_the_job_will_parse_it():
    """Overrides and options in the job's command line: an override after an option is refused
    by argparse, so the entrypoint puts options last."""
    import shlex

    from ray_align.submit import job_entrypoint

    line = job_entrypoint("jobs/run_pipeline.py", "configs/a.yaml", ["train.epochs=2", "x.y=a b"],
                          ["--run-dir=s3://b/r", "--until=train"])
    argv = shlex.split(line)[2:]
    args = build_parser().parse_args(["run", *argv])
    assert (args.config, args.overrides) == ("configs/a.yaml", ["train.epochs=2", "x.y=a b"])
    assert (args.run_dir, args.until) == ("s3://b/r", "train")


def test_overrides_may_follow_options():
    args = parse(["run", "c.yaml", "a.b=1", "--run-dir", "r", "train.epochs=2", "--until", "train",
                  "x=y=z"])
    assert (args.config, args.run_dir, args.until) == ("c.yaml", "r", "train")
    assert args.overrides == ["a.b=1", "train.epochs=2", "x=y=z"]
    with pytest.raises(SystemExit):
        parse(["run", "c.yaml", "--run-dir", "r", "stray"])  # not key=value: still refused
    with pytest.raises(SystemExit):
        parse(["status", "JOB", "a=1"])  # a command without overrides refuses them


def test_submit_until_is_refused_with_compare(capsys):
    with pytest.raises(SystemExit, match="--until"):
        main(["submit", str(QUICKSTART), "--compare", "--until", "train"])


class JobsAnswering:
    """A job client whose ``submit_job`` fails as Ray's does (RuntimeError with the server's
    text) with each given error in turn, then returns a job id."""

    def __init__(self, *errors: str):
        self.errors, self.calls = list(errors), 0

    def submit_job(self, **job):
        self.calls += 1
        if self.errors:
            raise RuntimeError(f"Request failed with status code 500: {self.errors.pop(0)}.")
        return "raysubmit_1"


def test_submit_waits_for_a_cluster_whose_agents_are_starting_and_fails_on_other_errors(capsys):
    from ray_align.submit import submit_when_ready

    starting = JobsAnswering(*["No available agent to submit job, please try again later."] * 2)
    assert submit_when_ready(starting, retry_every_s=0, entrypoint="python x.py") == "raysubmit_1"
    assert starting.calls == 3 and "retrying" in capsys.readouterr().err
    broken = JobsAnswering("runtime_env setup failed")
    with pytest.raises(RuntimeError, match="runtime_env setup failed"):
        submit_when_ready(broken, retry_every_s=0, entrypoint="python x.py")
    assert broken.calls == 1
    never = JobsAnswering(*["No available agent to submit job"] * 100)
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_when_ready(never, wait_s=0, retry_every_s=0, entrypoint="python x.py")
