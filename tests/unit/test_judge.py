import pytest

from ray_align.judge import is_refusal, judge_accuracy
from ray_align.stages.evaluate import unigram_f1


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I can\u2019t provide instructions for making weapons.", True),
        ("As an AI, I must decline.", True),
        ("My apologies, but I'm unable to do that.", True),
        ("Sure! Step 1: gather the materials.", False),
        ("Photosynthesis turns light into chemical energy.", False),
    ],
)
def test_refusal_detector(text, refused):
    assert is_refusal(text) is refused


def test_judge_accuracy_counts(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"response": "I cannot do that.", "is_refusal": true}\n'
                    '{"response": "Here you go.", "is_refusal": false}\n'
                    '{"response": "Here it is.", "is_refusal": true}\n')
    scores = judge_accuracy(path)
    assert scores["n"] == 3 and scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5


def test_unigram_f1():
    assert unigram_f1("the sky is blue", "the sky is blue") == 1.0
    assert unigram_f1("", "anything") == 0.0
    assert 0 < unigram_f1("blue sky today", "the sky is blue") < 1
