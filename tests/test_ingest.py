"""ingest: every supported file type and form, stable ids, and unreadable rows kept with a reason."""
import json

import pandas as pd
import pytest

from loraflow.errors import LoraflowError
from tasks.ingest import ingest

ALPACA = {"instruction": "What is the capital of Peru?", "input": "", "output": "Lima"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
PC = {"prompt": "Say hi.", "completion": "hi"}


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_jsonl_all_three_forms(tmp_path):
    df = ingest([jsonl(tmp_path / "a.jsonl", [ALPACA, CHAT, PC])])
    assert list(df["format"]) == ["alpaca", "chat", "prompt_completion"]
    assert list(df["line"]) == [1, 2, 3] and set(df["source"]) == {str(tmp_path / "a.jsonl")}
    assert json.loads(df["messages"][0]) == [{"role": "user", "content": ALPACA["instruction"]},
                                             {"role": "assistant", "content": "Lima"}]
    assert json.loads(df["messages"][2])[-1] == {"role": "assistant", "content": "hi"}


def test_alpaca_input_joins_instruction(tmp_path):
    row = {"instruction": "Classify the sentiment.", "input": "Great meal!", "output": "positive"}
    df = ingest([jsonl(tmp_path / "a.jsonl", [row])])
    assert json.loads(df["messages"][0])[0]["content"] == "Classify the sentiment.\n\nGreat meal!"


def test_ids_are_content_hashes_stable_under_reordering(tmp_path):
    a = ingest([jsonl(tmp_path / "a.jsonl", [ALPACA, CHAT])])
    b = ingest([jsonl(tmp_path / "b.jsonl", [CHAT, ALPACA])])
    assert list(a["id"]) == list(reversed(list(b["id"])))
    own = ingest([jsonl(tmp_path / "c.jsonl", [{**ALPACA, "id": "row-7"}])])
    assert own["id"][0] == "row-7"


def test_malformed_line_is_kept_with_reason(tmp_path):
    df = ingest([jsonl(tmp_path / "a.jsonl", [ALPACA, '{"instruction": "x", ', CHAT])])
    assert len(df) == 3
    assert df["ingest_error"][1].startswith("malformed JSON") and df["line"][1] == 2
    assert df["ingest_error"][[0, 2]].isna().all()


def test_missing_field_and_unknown_form(tmp_path):
    df = ingest([jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}, {"question": "y"}])])
    assert "missing field(s): output" in df["ingest_error"][0]
    assert "no recognised fields" in df["ingest_error"][1]


def test_csv_with_quotes_and_newlines(tmp_path):
    p = tmp_path / "a.csv"
    pd.DataFrame([{"instruction": 'Say "hi",\nplease', "input": "", "output": "hi"},
                  {"instruction": "Two", "input": "", "output": "2"}]).to_csv(p, index=False)
    df = ingest([str(p)])
    assert json.loads(df["messages"][0])[0]["content"] == 'Say "hi",\nplease'
    assert df["ingest_error"].isna().all() and len(df) == 2


def test_csv_rows_name_the_physical_line_they_start_on(tmp_path):
    """A quoted field spanning lines pushes later records down: a reject says the line an editor shows."""
    p = tmp_path / "a.csv"
    p.write_text('instruction,input,output\n"one\ntwo\nthree",,a\n\nsecond,,\nthird,,c\n', encoding="utf-8")
    df = ingest([str(p)])
    assert list(df["line"]) == [2, 6, 7]
    assert df["ingest_error"].isna().tolist() == [True, True, True]  # an empty output is validation's to reject


def test_a_sources_own_column_names_are_mapped(tmp_path):
    """A support-ticket CSV keeps its columns: params map them, and `task` drives per-family scoring."""
    from loraflow.params import Source
    p = tmp_path / "tickets.csv"
    pd.DataFrame([{"ticket_id": "T-1", "question": "Reset my password", "answer": "Use the link.", "task": "account"},
                  {"ticket_id": "T-2", "question": "Refund?", "answer": "Within 30 days.", "task": "billing"}]
                 ).to_csv(p, index=False)
    mapping = {"question": "instruction", "answer": "output", "task": "family", "ticket_id": "id"}
    df = ingest([Source(path=str(p), columns=mapping)])
    assert list(df["id"]) == ["T-1", "T-2"] and list(df["family"]) == ["account", "billing"]
    assert json.loads(df["messages"][1]) == [{"role": "user", "content": "Refund?"},
                                             {"role": "assistant", "content": "Within 30 days."}]
    # the same mapping reads a JSONL file with those names
    j = jsonl(tmp_path / "t.jsonl", [{"question": "Q", "answer": "A", "task": "x"}])
    assert ingest([Source(path=j, columns=mapping)])["family"].tolist() == ["x"]
    with pytest.raises(LoraflowError, match=r"tickets.csv: ingest.sources maps column\(s\) \['body'\]"):
        ingest([Source(path=str(p), columns={"body": "instruction"})])
    with pytest.raises(LoraflowError, match="Map your column names"):
        ingest([str(p)])  # unmapped: no supported form, and the error says how to map
    with pytest.raises(ValueError, match="unknown field"):
        Source(path=str(p), columns={"question": "prompt_text"})


def test_parquet_with_message_lists(tmp_path):
    p = tmp_path / "a.parquet"
    pd.DataFrame([CHAT, CHAT | {"messages": CHAT["messages"] * 2}]).to_parquet(p)
    df = ingest([str(p)])
    assert list(df["format"]) == ["chat", "chat"] and len(json.loads(df["messages"][1])) == 4


def test_saved_datasets_directory(tmp_path):
    from datasets import Dataset
    Dataset.from_list([PC, PC | {"completion": "hello"}]).save_to_disk(str(tmp_path / "ds"))
    df = ingest([str(tmp_path / "ds")])
    assert list(df["format"]) == ["prompt_completion"] * 2


def test_missing_path_and_empty_file_are_clear_errors(tmp_path):
    with pytest.raises(LoraflowError, match="does not exist"):
        ingest([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LoraflowError, match="no rows"):
        ingest([str(tmp_path / "empty.jsonl")])


def test_system_prompt_added_where_missing(tmp_path):
    df = ingest([jsonl(tmp_path / "a.jsonl", [ALPACA])], system_prompt="Be brief.")
    assert json.loads(df["messages"][0])[0] == {"role": "system", "content": "Be brief."}


def test_data_users_hand_over(tmp_path):
    """ShareGPT rows, OpenAI-style content parts, capitalised roles, and a `task` column as the family."""
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}], "task": "greeting"}
    parts = {"messages": [{"role": "User", "content": [{"type": "text", "text": "Capital of "},
                                                       {"type": "text", "text": "Peru?"}]},
                          {"role": "ASSISTANT", "content": "Lima"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "A cat"}]}
    df = ingest([jsonl(tmp_path / "h.jsonl", [sharegpt, parts, image])])
    assert list(df["format"]) == ["sharegpt", "chat", "chat"]
    assert json.loads(df["messages"][0]) == [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert df["family"][0] == "greeting"
    assert json.loads(df["messages"][1]) == [{"role": "user", "content": "Capital of Peru?"},
                                             {"role": "assistant", "content": "Lima"}]
    # a non-text part is not silently flattened: validation rejects the row (content is not a string)
    from loraflow.params import ValidateParams
    from tasks.validate import reasons_by_row
    assert 2 in reasons_by_row(df, ValidateParams()) and 1 not in reasons_by_row(df, ValidateParams())


def test_gzip_compressed_files(tmp_path):
    import gzip
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(ALPACA) + "\n" + json.dumps(CHAT) + "\n")
    with gzip.open(tmp_path / "b.csv.gz", "wt", encoding="utf-8") as f:
        f.write("instruction,input,output\nWhat is 2+2?,,4\n")
    with gzip.open(tmp_path / "c.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps([PC]))
    df = ingest([str(tmp_path / n) for n in ("a.jsonl.gz", "b.csv.gz", "c.json.gz")])
    assert list(df["format"]) == ["alpaca", "chat", "alpaca", "prompt_completion"] and df["ingest_error"].isna().all()


def test_a_datasets_dataset_through_load_dataset(tmp_path, monkeypatch):
    """A `datasets` name goes through load_dataset: here a local dataset directory of JSONL files (the
    hub is out of reach; a hub id takes the same call)."""
    from loraflow.params import Source
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ds").mkdir()
    jsonl(tmp_path / "ds" / "train.jsonl", [ALPACA, PC])
    df = ingest([Source(dataset=str(tmp_path / "ds"), split="train")])
    assert list(df["format"]) == ["alpaca", "prompt_completion"]
    assert set(df["source"]) == {f"dataset:{tmp_path / 'ds'}:train"}
    with pytest.raises(LoraflowError, match="could not be loaded"):
        ingest([Source(dataset=str(tmp_path / "missing"))])


def test_mixing_samples_deterministically_whatever_the_order(tmp_path):
    from loraflow.params import Source
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}"} for i in range(100)]
    forward, backward = jsonl(tmp_path / "f.jsonl", rows), jsonl(tmp_path / "b.jsonl", rows[::-1])
    a = ingest([Source(path=forward, max_rows=40, weight=0.5)])
    b = ingest([Source(path=backward, max_rows=40, weight=0.5)])
    assert len(a) == 20 and sorted(a["id"]) == sorted(b["id"])
    assert a.attrs["read_per_source"] == {forward: 100}
    assert len(ingest([Source(path=forward, weight=0.25)])) == 25
    with pytest.raises(ValueError, match="exactly one of path or dataset"):
        Source(path=forward, dataset="x")
