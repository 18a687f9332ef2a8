"""``mmafm generate``: a text-model checkpoint (or its stage directory) and its tokenizer in, the
prompts' continuations out; bad input exits 2 with a message naming the problem."""

import pytest

from mmafm.cli import main
from mmafm.inference import generate_text
from mmafm.tokenizer import train_tokenizer


@pytest.mark.parametrize("as_stage_dir", [True, False], ids=["stage_dir", "checkpoint"])
def test_generate_prints_each_prompt_continued_as_the_library_does(text_checkpoint, as_stage_dir, capsys):
    source = text_checkpoint["stage_dir"] if as_stage_dir else text_checkpoint["checkpoint"]
    prompts = ["a red", "a blue square"]
    assert main(["generate", str(source), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    want = generate_text(text_checkpoint["model"], text_checkpoint["tokenizer"], prompts, 6)
    assert out.strip() == "\n\n".join(row["prompt"] + row["completion"] for row in want)
    assert "tok/s" in err


def test_generate_bfloat16_and_sampling_run(text_checkpoint, capsys):
    assert main(["generate", str(text_checkpoint["checkpoint"]), "--prompt", "a green", "--dtype", "bfloat16",
                 "--temperature", "0.9", "--top-k", "20", "--seed", "3", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("a green")


def test_generate_bad_input_exits_2_naming_the_problem(text_checkpoint, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such stage directory or text-model checkpoint" in capsys.readouterr().err
    words = ["some other text", "with quite different words", "than the captions above", "number 12345"]
    other = train_tokenizer(words * 30, tmp_path / "other", vocab_size=310)
    assert main(["generate", str(text_checkpoint["checkpoint"]), "--prompt", "x",
                 "--tokenizer", str(tmp_path / "other.model")]) == 2
    assert f"has {other.vocab_size} tokens" in capsys.readouterr().err
    too_many = str(text_checkpoint["model"].config.max_seq_len)
    assert main(["generate", str(text_checkpoint["checkpoint"]), "--prompt", "a red", "--max-new-tokens", too_many]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert main(["generate", str(text_checkpoint["checkpoint"]), "--prompt", "a red", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
