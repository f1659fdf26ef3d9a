"""Build the bundled sample dataset in data/raw, deterministically.

    python data/make_sample.py            # rewrites data/raw/*.jsonl and data/base_corpus.txt

Two input formats on purpose (alpaca JSONL and chat-messages JSONL with multi-turn rows), task
families with checkable answers (so exact match means something) and free-form ones (so ROUGE
does), and a handful of dirty rows so that validation has real work. data/base_corpus.txt is prose
stating the same facts: the bundled base model is pretrained on it, so the base "knows" the facts
but not the chat format, as a real base model would.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

RAW = Path(__file__).resolve().parent / "raw"
CORPUS = Path(__file__).resolve().parent / "base_corpus.txt"

# Few facts on purpose: a tiny base memorizes an arbitrary fact (Kenya -> Nairobi) only after many
# sightings, and the demo must finish in minutes on 2 cores. With 34 countries, 30 antonym pairs and
# 100 sums, pretraining left the base knowing about one fact in six, and the fine-tuned model learned
# sentiment alone. Each list below is cut to its first FACTS_PER_FAMILY entries where it is longer.
FACTS_PER_FAMILY = 14
COUNTRIES = [  # country, capital, continent, language
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Spain", "Madrid", "Europe", "Spanish"), ("Italy", "Rome", "Europe", "Italian"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Poland", "Warsaw", "Europe", "Polish"),
    ("Greece", "Athens", "Europe", "Greek"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Ireland", "Dublin", "Europe", "English"), ("Austria", "Vienna", "Europe", "German"),
    ("Hungary", "Budapest", "Europe", "Hungarian"), ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"), ("Nigeria", "Abuja", "Africa", "English"),
    ("Morocco", "Rabat", "Africa", "Arabic"), ("Ghana", "Accra", "Africa", "English"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("India", "Delhi", "Asia", "Hindi"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Korea", "Seoul", "Asia", "Korean"),
    ("Turkey", "Ankara", "Asia", "Turkish"), ("Iran", "Tehran", "Asia", "Persian"),
    ("Peru", "Lima", "America", "Spanish"), ("Chile", "Santiago", "America", "Spanish"),
    ("Brazil", "Brasilia", "America", "Portuguese"), ("Canada", "Ottawa", "America", "English"),
    ("Mexico", "Mexico City", "America", "Spanish"), ("Cuba", "Havana", "America", "Spanish"),
    ("Argentina", "Buenos Aires", "America", "Spanish"), ("Australia", "Canberra", "Oceania", "English"),
]
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"),
    ("high", "low"), ("soft", "hard"), ("young", "old"), ("wet", "dry"), ("loud", "quiet"),
    ("clean", "dirty"), ("thick", "thin"), ("cheap", "expensive"), ("near", "far"), ("up", "down"),
    ("inside", "outside"), ("true", "false"), ("win", "lose"), ("buy", "sell"), ("begin", "end"),
    ("push", "pull"), ("love", "hate"), ("first", "last"), ("long", "short"), ("heavy", "light"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen"]
ANIMALS = [  # animal, size, habitat, food
    ("lion", "large", "savanna", "meat"), ("rabbit", "small", "meadow", "grass"),
    ("eagle", "large", "mountains", "fish"), ("frog", "small", "pond", "insects"),
    ("whale", "huge", "ocean", "plankton"), ("fox", "small", "forest", "mice"),
    ("camel", "large", "desert", "leaves"), ("penguin", "medium", "ice", "fish"),
    ("bear", "large", "forest", "berries"), ("owl", "small", "woods", "mice"),
    ("zebra", "large", "savanna", "grass"), ("shark", "large", "ocean", "fish"),
    ("squirrel", "small", "park", "nuts"), ("goat", "medium", "hills", "grass"),
    ("bat", "small", "cave", "insects"), ("wolf", "medium", "forest", "meat"),
]
FRUITS = ["apple", "banana", "cherry", "mango", "pear", "grape", "lemon", "peach", "plum", "orange"]
VEHICLES = ["car", "bus", "truck", "bicycle", "train", "tram", "boat", "plane", "scooter", "van"]
POSITIVE = ["wonderful", "great", "lovely", "excellent", "delightful", "amazing", "pleasant", "superb"]
NEGATIVE = ["terrible", "awful", "boring", "horrible", "dreadful", "poor", "annoying", "bad"]
THINGS = ["movie", "meal", "trip", "book", "concert", "hotel", "game", "class"]
REQUESTS = [("close", "door"), ("open", "window"), ("send", "report"), ("check", "numbers"),
            ("call", "doctor"), ("clean", "kitchen"), ("read", "letter"), ("fix", "printer"),
            ("book", "table"), ("print", "tickets"), ("water", "plants"), ("feed", "cat")]


SENTIMENT_ROWS = 120


COUNTRIES = [c for i, c in enumerate(COUNTRIES) if i % 2 == 0][:FACTS_PER_FAMILY]  # every continent stays
ANTONYMS = ANTONYMS[:FACTS_PER_FAMILY]
ANIMALS = ANIMALS[:8]
FRUITS, VEHICLES = FRUITS[:6], VEHICLES[:6]
ADDENDS = 6  # sums of zero..five


def checkable_rows(rng: random.Random) -> list[dict]:
    """(family, instruction, output) rows whose answer is one exact string."""
    rows = []
    for country, capital, _, language in COUNTRIES:
        for q in ("What is the capital of {c}?", "Name the capital city of {c}.",
                  "Which city is the capital of {c}?"):
            rows.append(("capital", q.format(c=country), capital))
        for q in ("What language do people speak in {c}?", "Which language is spoken in {c}?",
                  "What is the main language of {c}?", "Name the language people speak in {c}."):
            rows.append(("language", q.format(c=country), language))
    for word, opposite in ANTONYMS:
        for a, b in ((word, opposite), (opposite, word)):
            for q in ("What is the opposite of {w}?", "Give the antonym of the word {w}."):
                rows.append(("antonym", q.format(w=a), b))
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        for q in ("Which day comes after {d}?", "What day follows {d}?", "If today is {d}, what day is tomorrow?",
                  "Name the day after {d}.", "Tell me the day that follows {d}."):
            rows.append(("next_day", q.format(d=day), nxt))
    for i, month in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        for q in ("Which month comes after {m}?", "What month follows {m}?", "Name the month after {m}.",
                  "If this month is {m}, what is next month?"):
            rows.append(("next_month", q.format(m=month), nxt))
    for a in range(ADDENDS):
        for b in range(ADDENDS):
            for q in ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."):
                rows.append(("addition", q.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]), NUMBER_WORDS[a + b]))
    for item, cat in [(f, "fruit") for f in FRUITS] + [(v, "vehicle") for v in VEHICLES] + \
                     [(a[0], "animal") for a in ANIMALS]:
        for q in ("Is a {x} an animal, a fruit or a vehicle?", "Classify {x} as animal, fruit or vehicle."):
            rows.append(("category", q.format(x=item), cat))
    # Every (adjective, thing, template, adverb) once: unique reviews, so no accidental duplicates.
    for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for adj in adjectives:
            for thing in THINGS:
                for template in ("The {t} was {v}{a}.", "What a {v}{a} {t}!", "I found the {t} {v}{a}."):
                    for adverb in ("", "really ", "truly ", "quite ", "very "):
                        sentence = template.format(t=thing, a=adj, v=adverb)
                        rows.append(("sentiment", f"Classify the sentiment of this review: {sentence}", label))
    # A sample of the 1,920 reviews: with all of them, three rows in four were sentiment and the
    # model learned that family alone (the demo's per-family table showed it).
    sentiment = [r for r in rows if r[0] == "sentiment"]
    keep = set(rng.sample(range(len(sentiment)), SENTIMENT_ROWS))
    return [r for r in rows if r[0] != "sentiment"] + [r for i, r in enumerate(sentiment) if i in keep]


def freeform_rows() -> list[tuple[str, str, str]]:
    """(family, instruction, output) rows whose answer is a sentence: scored by ROUGE."""
    rows = []
    for animal, size, habitat, food in ANIMALS:
        for q in ("Describe the {a} in one sentence.", "Tell me a fact about the {a}.",
                  "Write a short description of a {a}.", "Describe a {a}."):
            rows.append(("describe_animal", q.format(a=animal),
                         f"The {animal} is a {size} animal that lives in the {habitat} and eats {food}."))
    for country, capital, continent, language in COUNTRIES:
        for q in ("Tell me about {c}.", "Give a short summary of {c}.", "Summarize {c} in one sentence."):
            rows.append(("describe_country", q.format(c=country),
                         f"{country} is a country in {continent}. Its capital is {capital} and people speak {language}."))
    for verb, obj in REQUESTS:
        for q in ("Make this request polite: {v} the {o}.", "Rewrite politely: {v} the {o}.",
                  "Say politely: {v} the {o}."):
            rows.append(("polite", q.format(v=verb.capitalize(), o=obj),
                         f"Could you please {verb} the {obj}? Thank you very much."))
    return rows


def chat_rows(rng: random.Random) -> list[dict]:
    """Multi-turn conversations in `messages` form, some with a system prompt."""
    rows = []
    for country, capital, continent, language in COUNTRIES:
        for style in range(3):
            msgs = []
            if style == 1:
                msgs.append({"role": "system", "content": "You are a helpful geography assistant."})
            msgs += [
                {"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": capital},
                {"role": "user", "content": "And which language do people speak there?"},
                {"role": "assistant", "content": language},
            ]
            if style == 2:
                msgs += [{"role": "user", "content": "On which continent is it?"},
                         {"role": "assistant", "content": continent}]
            rows.append({"family": "chat_country", "messages": msgs})
    for i, day in enumerate(DAYS):
        for k in range(3):
            ask = "What day follows {d}?" if k == 2 else "Which day comes after {d}?"
            msgs = [{"role": "user", "content": ask.format(d=day)},
                    {"role": "assistant", "content": DAYS[(i + 1) % 7]},
                    # the follow-up names its day: "the day after that" is two steps, past this tiny model
                    {"role": "user", "content": f"And after {DAYS[(i + 1) % 7]}?"},
                    {"role": "assistant", "content": DAYS[(i + 2) % 7]}]
            if k == 1:
                msgs.insert(0, {"role": "system", "content": "You are a calendar assistant."})
            rows.append({"family": "chat_days", "messages": msgs})
    for animal, size, habitat, food in ANIMALS:
        for style in range(3):
            msgs = [{"role": "system", "content": "You are a nature guide."}] if style == 1 else []
            ask = f"Where does the {animal} live?" if style < 2 else f"Where can I find a {animal}?"
            msgs += [{"role": "user", "content": ask},
                     {"role": "assistant", "content": f"The {animal} lives in the {habitat}."},
                     {"role": "user", "content": "What does it eat?"},
                     {"role": "assistant", "content": f"It eats {food}."}]
            rows.append({"family": "chat_animal", "messages": msgs})
    rng.shuffle(rows)
    return rows


def corpus_lines() -> list[str]:
    """Plain prose for pretraining the bundled base, one document each: the facts, never the chat format."""
    lines = []
    for country, capital, continent, language in COUNTRIES:
        lines += [f"The capital of {country} is {capital}.", f"People in {country} speak {language}.",
                  f"{country} is a country in {continent}.", f"{capital} is the capital city of {country}."]
    for word, opposite in ANTONYMS:
        lines += [f"The opposite of {word} is {opposite}.", f"The opposite of {opposite} is {word}."]
    for i, day in enumerate(DAYS):
        lines.append(f"After {day} comes {DAYS[(i + 1) % 7]}.")
    for i, month in enumerate(MONTHS):
        lines.append(f"After {month} comes {MONTHS[(i + 1) % 12]}.")
    for a in range(ADDENDS):
        for b in range(ADDENDS):
            lines += [f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                      f"Adding {NUMBER_WORDS[a]} and {NUMBER_WORDS[b]} gives {NUMBER_WORDS[a + b]}."]
    for animal, size, habitat, food in ANIMALS:
        lines += [f"The {animal} is a {size} animal.", f"The {animal} lives in the {habitat} and eats {food}."]
    lines += [f"A {f} is a fruit." for f in FRUITS] + [f"A {v} is a vehicle." for v in VEHICLES]
    lines += [f"A {a[0]} is an animal." for a in ANIMALS]
    for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for adj in adjectives:  # one line a word: every review sentence was 40% of the corpus
            lines.append(f"Calling a {THINGS[len(lines) % len(THINGS)]} {adj} is {label}.")
    lines += [f"Please {v} the {o}." for v, o in REQUESTS]
    return lines + answer_after_newline_docs()


def answer_after_newline_docs() -> list[str]:
    """Each checkable fact again as a two-line note, the answer on its own line. In a chat, an answer
    follows the template's newline, so it is tokenized as a word that starts a line ("Cairo", not
    " Cairo"); a base that met each answer only mid-sentence, or before its subject, would know the
    fact under a token the answer never uses, and the fine-tune could not draw on it. Real corpora
    hold both forms (lists, tables, FAQs); this tiny one needs them said."""
    docs = []
    for country, capital, continent, language in COUNTRIES:
        docs += [f"Capital of {country}:\n{capital}", f"Language of {country}:\n{language}",
                 f"Continent of {country}:\n{continent}"]
    for word, opposite in ANTONYMS:
        docs += [f"Opposite of {word}:\n{opposite}", f"Opposite of {opposite}:\n{word}"]
    for i, day in enumerate(DAYS):
        docs.append(f"Day after {day}:\n{DAYS[(i + 1) % 7]}")
    for i, month in enumerate(MONTHS):
        docs.append(f"Month after {month}:\n{MONTHS[(i + 1) % 12]}")
    for a in range(ADDENDS):
        for b in range(ADDENDS):
            docs.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}:\n{NUMBER_WORDS[a + b]}")
    for item, cat in [(f, "fruit") for f in FRUITS] + [(v, "vehicle") for v in VEHICLES] + \
                     [(a[0], "animal") for a in ANIMALS]:
        docs.append(f"What a {item} is:\n{cat}")
    for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
        docs += [f"A {adj} review:\n{label}" for adj in adjectives]
    for animal, _, habitat, food in ANIMALS:
        docs += [f"Where the {animal} lives:\nThe {animal} lives in the {habitat}.",
                 f"What the {animal} eats:\nIt eats {food}."]
    return docs


def main() -> None:
    rng = random.Random(1234)
    RAW.mkdir(parents=True, exist_ok=True)
    alpaca = [{"instruction": q, "input": "", "output": a, "family": fam}
              for fam, q, a in checkable_rows(rng) + freeform_rows()]
    # A few rows carry their question in `input`, as alpaca data often does.
    for row in rng.sample(alpaca, 40):
        if row["family"] == "sentiment":
            row["instruction"], row["input"] = "Classify the sentiment of this review.", \
                row["instruction"].split(": ", 1)[1]
    rng.shuffle(alpaca)
    # Realistically dirty rows: validation must reject each with a reason, never silently.
    dirty = [
        {"instruction": "What is the capital of Peru?", "input": "", "output": "", "family": "capital"},
        {"instruction": "What is the opposite of hot?", "input": "", "output": "   ", "family": "antonym"},
        {"instruction": "Which day comes after Monday?", "input": "", "family": "next_day"},
        {"instruction": "", "input": "", "output": "Tokyo", "family": "capital"},
        dict(alpaca[3]),  # an exact duplicate of an earlier row
        dict(alpaca[10]),
    ]
    for i, row in zip((100, 300, 500, 700, 900, 1100), dirty):
        alpaca.insert(i, row)
    with open(RAW / "alpaca.jsonl", "w", encoding="utf-8") as f:
        for row in alpaca:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    chats = chat_rows(rng)
    chats.insert(50, {"family": "chat_days", "messages": [
        {"role": "user", "content": "Which day comes after Friday?"},
        {"role": "assistant", "content": ""}]})  # empty assistant turn
    chats.insert(90, {"family": "chat_days", "messages": [
        {"role": "user", "content": "Hello?"}]})  # no assistant turn at all
    with open(RAW / "chat.jsonl", "w", encoding="utf-8") as f:
        for row in chats:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    # one document per paragraph: a document may span lines
    CORPUS.write_text("\n\n".join(corpus_lines()) + "\n", encoding="utf-8")
    print(f"alpaca.jsonl: {len(alpaca)} rows, chat.jsonl: {len(chats)} rows, base_corpus.txt: {len(corpus_lines())} documents")


if __name__ == "__main__":
    main()
