from loraflow.audit import audit_flags, echoes_prompt, repeats_ngram

KW = dict(ngram=3, min_repeats=3, echo_min_chars=20)


def test_clean_answer_has_no_flags():
    assert audit_flags("Lima", True, "What is the capital of Peru?", **KW) == []


def test_each_flag():
    prompt = "Tell me a fact about the owl in one sentence."
    assert audit_flags("", True, prompt, **KW) == ["empty"]
    assert "prompt_echo" in audit_flags("Tell me a fact about the owl, please", True, prompt, **KW)
    assert "repetition_loop" in audit_flags("the owl is the owl is the owl is the owl is", True, prompt, **KW)
    assert audit_flags("The owl eats mice.", False, prompt, **KW) == ["no_eos"]


def test_helpers_thresholds():
    assert not repeats_ngram("a b c a b c", 3, 3) and repeats_ngram("a b c a b c a b c", 3, 3)
    assert not echoes_prompt("short", "short prompt text here", 20)
    assert echoes_prompt("WHAT IS THE CAPITAL   of peru", "What is the capital of Peru?", 20)
