"""params.yaml: every section typed and checked; bad keys and values named, every problem at once."""
import re

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


def test_a_missing_or_empty_section_is_refused_not_defaulted(tmp_path):
    """It would run on the code's defaults, which are not the values params.yaml documents."""
    p = write(tmp_path, "train:\n  rank: 4\nevaluate:\n")
    assert load_section("train", p).rank == 4
    with pytest.raises(ParamsError, match="evaluate: section missing or empty"):
        load_section("evaluate", p)
    with pytest.raises(ParamsError, match="tokenize: section missing or empty"):
        load_section("tokenize", p)
    assert load_section("lineage", p) is not None  # a section with no settings needs no keys


@pytest.mark.parametrize("section, key, value, named", [
    ("train", "micro_batch", 0, "micro_batch must be at least 1"),
    ("train", "micro_batch", -2, "micro_batch must be at least 1"),
    ("train", "target_modules", [], "name at least one module"),
    ("train", "lr", float("inf"), "train.lr: Input should be a finite number"),
    ("train", "lr", True, "train.lr: Input should be a valid number"),
    ("base", "trust_remote_code", "yes", "base.trust_remote_code: Input should be a valid boolean"),
    ("evaluate", "batch_size", 0, "batch_size must be at least 1"),
    ("promote", "metrics", [], "promote.metrics: List should have at least 1 item"),
])
def test_values_that_would_crash_or_do_nonsense_are_refused(tmp_path, section, key, value, named):
    import yaml
    from conftest import ROOT
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data[section][key] = value
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=re.escape(named)):
        load_section(section, p)


def test_old_batch_keys_name_their_replacement(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  batch_size: 8\n  grad_accum: 2\n")
    with pytest.raises(ParamsError, match=r"train: batch_size and grad_accum were replaced by rows_per_step"):
        load_section("train", params)


def test_a_secret_in_params_is_refused_naming_the_key(tmp_path):
    import yaml
    from conftest import ROOT
    from loraflow.overrides import check
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["ingest"]["system_prompt"] = "Use the key hf_abcdefghijklmnopqrstuvwxyz0123 to log in."
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match="ingest.system_prompt: holds a token-shaped secret.*environment variable"):
        load_section("ingest", p)
    (tmp_path / "clean.yaml").write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ParamsError, match="ingest.system_prompt: holds a token-shaped secret"):
        check(tmp_path / "clean.yaml", {"ingest.system_prompt": "sk-" + "a" * 30})


def test_an_override_is_written_as_given_never_redacted(tmp_path, monkeypatch):
    """Redaction is for logs and reports; the user's own params.yaml keeps exactly what they set."""
    from conftest import ROOT
    from loraflow.overrides import apply
    monkeypatch.setenv("MY_API_TOKEN", "a-value-of-my-own")
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    apply(p, {"ingest.system_prompt": "Answer as a-value-of-my-own would."})
    assert "Answer as a-value-of-my-own would." in p.read_text()


@pytest.mark.parametrize("override, named", [
    ("ingest.system_prompt=hf_abcdefghijklmnopqrstuvwxyz0123", "ingest.system_prompt: holds a token-shaped secret"),
    ("train.lrr=0.1", "train.lrr: unknown key"),
])
def test_a_bad_or_secret_override_stops_before_prefect_starts(tmp_path, override, named):
    """`loraflow run -S ...` checks every override first: nothing reaches Prefect's database or log."""
    import subprocess
    from conftest import BIN, ROOT, tool_env
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {k: v for k, v in tool_env().items() if not k.startswith("PREFECT_")}
    proc = subprocess.run([str(BIN / "loraflow"), "run", "--workdir", str(tmp_path), "-S", override], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and named in out and "Traceback" not in out
    assert "Flow run" not in out and "temporary server" not in out.lower()
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in out  # the error names the key, never the value
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
