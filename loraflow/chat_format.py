"""The chat format a run trains and generates with: which chat template renders the conversations,
and the end-of-turn, as one fact.

The template stage resolves both and writes them to data/interim/chat_format.json; tokenize audits
that the end-of-turn is trained, evaluate and the merge check stop generation on it, and the merged
model is saved with that template and a generation_config that stops there, so a serving stack
behaves as evaluated.

The end-of-turn comes from three places, all kept: what the template writes after an assistant
turn (loraflow.masking.end_of_turn_text), the model's generation_config stop ids, and an optional
template.end_of_turn override. Generation stops on any of them.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loraflow.errors import LoraflowError
from loraflow.masking import THINK_CLOSE, THINK_OPEN, Render, end_of_turn_text, probe_text, user_turn_end

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"  # named templates, loaded by path
NAMED_TEMPLATES = ("chatml", "llama3", "gemma", "mistral", "phi3", "qwen2.5")
TEMPLATE_TOKENS = TEMPLATES_DIR / "tokens.json"  # each named template's control tokens


@dataclass(frozen=True)
class ChatFormat:
    chat_template: str
    """The Jinja text every stage renders with, and the merged model is saved with."""
    template_source: str
    """Where it came from: 'tokenizer', a named template, or a file path."""
    end_of_turn: str
    """The text that ends an assistant turn: trained after every assistant turn."""
    end_of_turn_ids: list[int]
    """end_of_turn as token ids (one id for a special token)."""
    stop_ids: list[int]
    """Every id generation stops on: a one-token end_of_turn, the generation_config's and the tokenizer's eos."""
    date: str
    """The fixed date templates that print today's date render with (so the cache does not expire daily)."""
    sources: dict = field(default_factory=dict)
    """Which id came from where, for the audit and the README's table."""
    user_end: str = ""
    """What the template writes between a user turn and the answer (masking.user_turn_end): where
    user turns are located."""
    control_tokens: list[str] = field(default_factory=list)
    """The tokenizer's special and added tokens: text that must not come from a data row."""
    added_tokens: list[str] = field(default_factory=list)
    """Tokens the template needs and the base tokenizer lacked, added in this order (ids from its
    old size up): every later stage loads the tokenizer with them (run_tokenizer) and the model with
    its vocabulary grown to match (modeling.fit_vocab)."""
    untrained_tokens: list[str] = field(default_factory=list)
    """The template's tokens the base never learned: train.trainable_tokens: auto trains their
    embedding and output rows beside the adapter."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def read(cls, path: Path | str) -> "ChatFormat":
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LoraflowError(f"{path}: not found; run the template stage first (dvc repro template)") from None


def resolve_chat_template(setting: str, tokenizer) -> str:
    """template.chat_template: 'tokenizer' (its own), a template shipped with loraflow, or a .jinja path."""
    if setting == "tokenizer":
        own = tokenizer.chat_template
        if not own:
            raise LoraflowError(
                "the tokenizer has no chat template (a base, non-instruct checkpoint). Set template.chat_template "
                f"to one shipped with loraflow ({', '.join(NAMED_TEMPLATES)}) or to a .jinja file's path")
        return own if isinstance(own, str) else own.get("default") or next(iter(own.values()))
    if setting in NAMED_TEMPLATES:
        return (TEMPLATES_DIR / f"{setting}.jinja").read_text(encoding="utf-8")
    path = Path(setting)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise LoraflowError(f"template.chat_template: {setting!r} is neither 'tokenizer', a shipped template "
                        f"({', '.join(NAMED_TEMPLATES)}), nor an existing .jinja file")


def renderer(tokenizer, chat_template: str, date: dt.date) -> Render:
    """The template as a Render function, as apply_chat_template renders it (same Jinja environment,
    same special-token variables), at a fixed date for templates that print today's date, and without
    that method's per-call argument handling, which costs more than the rendering on short rows."""
    variables = dict(tokenizer.special_tokens_map)
    # Llama-3.x reads date_string, or calls strftime_now(); both see the fixed date.
    fixed = {"date_string": date.strftime("%d %b %Y"), "strftime_now": date.strftime}
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        compiled = _compile_jinja_template(chat_template)
    except (ImportError, AttributeError):  # another transformers layout: the public, slower path
        return lambda messages, gen: tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=gen, **fixed)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables, **fixed)
    return render


def fold_system_prompt(messages: list[dict]) -> list[dict]:
    """The system prompt prepended to the first user turn, for templates without a system role
    (template.system_role: fold), as Gemma's own newer templates do."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return rest


def save_chat_format(model_dir, tokenizer, chat: ChatFormat) -> None:
    """The tokenizer with the chat template training used, and a generation_config that stops on every
    end-of-turn id: a serving stack then renders and stops as the model was trained and evaluated."""
    from transformers import GenerationConfig
    tokenizer.chat_template = chat.chat_template
    tokenizer.save_pretrained(model_dir)
    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        config = GenerationConfig()
    config.eos_token_id = chat.stop_ids
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(model_dir)


def generation_config_stop_ids(location: str, revision: str | None = None) -> list[int]:
    """The eos ids of the model's generation_config.json (an int or a list), if it has one."""
    try:
        from transformers import GenerationConfig
        config = GenerationConfig.from_pretrained(location, revision=revision)
    except (OSError, ValueError):
        return []
    eos = config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def tokens_to_add(setting: str, add_tokens: str | list[str]) -> list[str]:
    """template.add_tokens: 'auto' is the named template's own control tokens (none for the
    tokenizer's template or a .jinja file); a list names them."""
    if add_tokens != "auto":
        return list(add_tokens)
    return json.loads(TEMPLATE_TOKENS.read_text(encoding="utf-8")).get(setting, [])


def add_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """The tokens the tokenizer lacked, added as special tokens (always one id, never split, never
    merged with neighbouring text), in order."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def run_tokenizer(ref, chat: "ChatFormat"):
    """The base tokenizer with the tokens the template stage added: the same ids in every stage."""
    from loraflow.modeling import load_tokenizer
    tokenizer = load_tokenizer(ref)
    size = len(tokenizer)
    if add_tokens(tokenizer, chat.added_tokens) != chat.added_tokens or len(tokenizer) != size + len(chat.added_tokens):
        raise LoraflowError(f"{ref.location}: the tokenizer changed since the template stage added "
                            f"{chat.added_tokens}; rerun from it (dvc repro template)")
    return tokenizer


def template_control_tokens(render: Render, control: list[str]) -> list[str]:
    """The control tokens a conversation rendered with this template holds (its role headers and
    turn ends), system prompt and generation prompt included where the template takes them."""
    text = probe_text(render) + render([{"role": "user", "content": "q"}], True)
    try:
        text += render([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], True)
    except Exception:  # noqa: BLE001 - a template without a system role raises its own plain Exception
        pass
    return sorted(t for t in control if t in text)


def make_chat_format(tokenizer, chat_template: str, template_source: str, render: Render, date: dt.date,
                     generation_config_ids: list[int], override: str | None = None) -> ChatFormat:
    """The end-of-turn from the template (or the override) and every id generation stops on."""
    eot = override if override is not None else end_of_turn_text(render)
    if not eot:
        raise LoraflowError("cannot tell where the chat template ends an assistant turn (it writes nothing "
                            "after the content); set template.end_of_turn to the text that ends a turn")
    eot_ids = tokenizer.encode(eot, add_special_tokens=False)
    sources = {"end_of_turn": "template.end_of_turn" if override is not None else "chat template",
               "generation_config": generation_config_ids, "tokenizer_eos": tokenizer.eos_token_id}
    stop = ([eot_ids[0]] if len(eot_ids) == 1 else []) + list(generation_config_ids) + (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return ChatFormat(chat_template=chat_template, template_source=template_source, end_of_turn=eot,
                      end_of_turn_ids=eot_ids, stop_ids=sorted(set(stop)), date=date.isoformat(), sources=sources,
                      user_end=user_turn_end(render), control_tokens=control_tokens(tokenizer))


def control_tokens(tokenizer) -> list[str]:
    """Strings the tokenizer reads as single control tokens wherever they stand in a text."""
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    return sorted({t for t in [*tokenizer.all_special_tokens, *added] if t and not t.isspace()}, key=lambda t: (-len(t), t))


WORD_JOINER = "\u2060"


def escape_control_tokens(text: str, tokens: list[str]) -> str:
    """Each control token in `text` broken by a word joiner after its first character: it stays text."""
    for token in tokens:
        if token in text:
            text = text.replace(token, token[0] + WORD_JOINER + token[1:])
    return text


def chat_format_for(tokenizer, params, generation_config_ids: list[int] = (),
                    base_knows_chat_tokens: bool = True) -> tuple[Render, ChatFormat]:
    """The renderer and the chat format that template params (TemplateParams) give for this tokenizer,
    which gains the tokens the template needs. The template's tokens count as untrained when they were
    added now, or the base is a base checkpoint: one given a template of loraflow's or a file
    (not its own), or one that says so (base_knows_chat_tokens false: the bundled base)."""
    chat_template = resolve_chat_template(params.chat_template, tokenizer)
    added = add_tokens(tokenizer, tokens_to_add(params.chat_template, params.add_tokens))
    render = renderer(tokenizer, chat_template, params.fixed_date)
    chat = make_chat_format(tokenizer, chat_template, params.chat_template, render, params.fixed_date,
                            list(generation_config_ids), params.end_of_turn)
    in_template = template_control_tokens(render, chat.control_tokens)
    base_model = params.chat_template != "tokenizer" or not base_knows_chat_tokens
    untrained = in_template if base_model else [t for t in in_template if t in added]
    return render, replace(chat, added_tokens=added, untrained_tokens=sorted(set(untrained) | set(added)))


REASONING_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), re.S)


def strip_reasoning(text: str) -> str:
    """The answer of a generation: `<think>...</think>` blocks removed, and an opening block the
    prompt started (DeepSeek-R1 prefills `<think>`) cut at its close. An empty template-style block
    is removed too, so a correct answer is never scored wrong for it."""
    text = REASONING_BLOCK.sub("", text)
    if THINK_CLOSE in text:
        text = text.split(THINK_CLOSE, 1)[1]
    return text.strip()
