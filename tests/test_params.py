import pytest

from loraflow.params import ParamsError, load_all, load_section


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_file_is_valid():
    sections = load_all("params.yaml")
    assert sections["train"].method == "lora"
    assert sections["evaluate"].exact_match_families


def test_unknown_key_is_named_with_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_section("train", p)
    assert str(p) in str(e.value) and "train.lrr: unknown key" in str(e.value)


def test_wrong_type_is_named(tmp_path):
    p = write(tmp_path, "train:\n  rank: sixteen\n")
    with pytest.raises(ParamsError, match=r"train\.rank"):
        load_section("train", p)


def test_every_problem_reported_at_once(tmp_path):
    p = write(tmp_path, "train:\n  rank: -1\n  epochs: x\ntokenize:\n  overflow: wrap\nbogus: {}\n")
    with pytest.raises(ParamsError) as e:
        load_all(p)
    msg = str(e.value)
    for key in ("train.rank", "train.epochs", "tokenize.overflow", "bogus: unknown section"):
        assert key in msg


def test_nested_section_checked(tmp_path):
    p = write(tmp_path, "base:\n  bundled:\n    hidden_size: 30\n    num_heads: 4\n")
    with pytest.raises(ParamsError, match="divisible"):
        load_section("base", p)


def test_missing_section_takes_defaults(tmp_path):
    p = write(tmp_path, "train:\n  rank: 4\n")
    assert load_section("evaluate", p).max_new_tokens > 0
    assert load_section("train", p).rank == 4


def test_old_batch_keys_name_their_replacement(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: 8\n  grad_accum: 2\n")
    with pytest.raises(ParamsError, match=r"train: batch_size and grad_accum were replaced by rows_per_step"):
        load_section("train", params)
