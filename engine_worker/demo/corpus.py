"""Procedural training text for the demo model: plain prose and chat conversations.

There is no internet and no model hub, so the demo model learns from text generated here by
a small grammar over a hand-written table of everyday facts. Everything is driven by one
``random.Random(seed)``, so the same seed always yields the same corpus. Chat conversations
are rendered with the very template the checkpoint ships, so the model learns the exact
format the API will send it.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# One line, no literal newlines: transformers renders with trim_blocks/lstrip_blocks, and
# whitespace-free tags keep the rendered text identical under any jinja2 whitespace setting.
# Every turn ends with <|end|> except the assistant's, which ends with the eos token so that
# generation stops where an answer ends.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Animal:
    name: str
    plural: str
    home: str  # a place phrase with its preposition ("on a farm"), so sentences stay grammatical
    food: str
    ability: str
    sound: str
    trait: str


@dataclass(frozen=True)
class Dish:
    name: str
    ingredients: str
    steps: tuple[str, str]
    meal: str


@dataclass(frozen=True)
class Season:
    name: str
    weather: str
    activity: str
    sight: str


@dataclass(frozen=True)
class SkyObject:
    name: str
    fact: str
    detail: str


ANIMALS = (
    Animal("cat", "cats", "in a warm house", "fish and chicken", "climb trees", "purrs", "curious"),
    Animal(
        "dog", "dogs", "in a house with a yard", "meat and biscuits", "run fast", "barks", "loyal"
    ),
    Animal(
        "fox", "foxes", "in the forest", "mice and berries", "hear tiny sounds", "yips", "clever"
    ),
    Animal(
        "owl", "owls", "in a hollow tree", "mice and insects", "see in the dark", "hoots", "wise"
    ),
    Animal("horse", "horses", "on a farm", "hay and apples", "gallop", "neighs", "strong"),
    Animal("cow", "cows", "on a farm", "grass and hay", "make milk", "moos", "calm"),
    Animal(
        "rabbit", "rabbits", "in a meadow", "carrots and clover", "jump high", "thumps", "quick"
    ),
    Animal("bee", "bees", "in a hive", "nectar and pollen", "make honey", "buzzes", "busy"),
    Animal("whale", "whales", "in the ocean", "krill and small fish", "dive deep", "sings", "huge"),
    Animal(
        "penguin", "penguins", "in the icy south", "fish and squid", "swim fast", "squawks", "brave"
    ),
    Animal("frog", "frogs", "near a pond", "flies and worms", "leap far", "croaks", "small"),
    Animal(
        "eagle",
        "eagles",
        "in the mountains",
        "fish and rabbits",
        "fly very high",
        "screeches",
        "proud",
    ),
    Animal(
        "bear",
        "bears",
        "in the woods",
        "berries, roots and fish",
        "sleep all winter",
        "growls",
        "big",
    ),
    Animal(
        "duck", "ducks", "on a lake", "seeds and water plants", "swim and fly", "quacks", "cheerful"
    ),
    Animal(
        "goat",
        "goats",
        "in the hills",
        "grass and leaves",
        "climb steep rocks",
        "bleats",
        "stubborn",
    ),
    Animal(
        "dolphin",
        "dolphins",
        "in warm seas",
        "fish and squid",
        "leap out of the water",
        "clicks",
        "playful",
    ),
)

DISHES = (
    Dish(
        "bread",
        "flour, water, yeast and salt",
        ("mix the dough", "bake it in a hot oven"),
        "for breakfast",
    ),
    Dish(
        "soup",
        "vegetables, water and herbs",
        ("chop the vegetables", "let them simmer in a pot"),
        "for dinner",
    ),
    Dish(
        "pancakes",
        "flour, milk, eggs and butter",
        ("whisk the batter", "cook it in a warm pan"),
        "for breakfast",
    ),
    Dish(
        "salad",
        "lettuce, tomatoes and cucumber",
        ("wash the greens", "toss them with a little oil"),
        "for lunch",
    ),
    Dish(
        "rice", "rice and water", ("rinse the rice", "cook it slowly with a lid on"), "for dinner"
    ),
    Dish(
        "tea",
        "tea leaves and hot water",
        ("boil the water", "let the leaves steep for a few minutes"),
        "in the afternoon",
    ),
    Dish(
        "pasta",
        "pasta, tomatoes and cheese",
        ("boil the pasta in salted water", "mix it with the sauce"),
        "for dinner",
    ),
    Dish(
        "cake",
        "flour, sugar, eggs and butter",
        ("beat the butter and sugar", "bake the batter until it is golden"),
        "at parties",
    ),
    Dish(
        "an omelette",
        "eggs, butter and cheese",
        ("beat the eggs", "cook them gently in a pan"),
        "for breakfast",
    ),
)

SEASONS = (
    Season(
        "spring",
        "mild and rainy",
        "plant seeds in the garden",
        "flowers bloom and birds build nests",
    ),
    Season(
        "summer", "warm and sunny", "swim in the lake", "the days are long and the fields are green"
    ),
    Season("autumn", "cool and windy", "collect apples", "the leaves turn red and gold"),
    Season(
        "winter", "cold and snowy", "build a snowman", "the nights are long and the ponds freeze"
    ),
)

SKY = (
    SkyObject(
        "the sun",
        "The sun is a star at the center of our solar system.",
        "It gives the earth light and warmth.",
    ),
    SkyObject(
        "the moon",
        "The moon travels around the earth.",
        "It shines because it reflects the light of the sun.",
    ),
    SkyObject(
        "mars",
        "Mars is the fourth planet from the sun.",
        "It looks red because of the dust on its ground.",
    ),
    SkyObject(
        "jupiter",
        "Jupiter is the largest planet in our solar system.",
        "It is a giant ball of gas with a great red storm.",
    ),
    SkyObject(
        "the earth",
        "The earth is the planet we live on.",
        "It takes one year to travel around the sun.",
    ),
    SkyObject(
        "the stars",
        "Stars are huge balls of hot gas.",
        "They look small because they are very far away.",
    ),
)

CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Mexico", "Mexico City"),
)  # fmt: skip

COLORS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
    ("a strawberry", "red"), ("coal", "black"), ("an orange", "orange"), ("a plum", "purple"),
)  # fmt: skip

NAMES = ("Ana", "Ben", "Mia", "Leo", "Sara", "Tom", "Nora", "Sam", "Lily", "Max")

GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to talk about?"),
    ("Good morning!", "Good morning! I hope you have a lovely day."),
    ("Hey, how are you?", "I am doing well, thank you. How can I help?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks for the help.", "You are welcome. Have a nice day!"),
    ("Who are you?", "I am a small demo assistant served by jetserve. I can talk about animals, food, the seasons, space and countries."),
    ("What can you do?", "I can answer simple questions about animals, food, the seasons, space and countries, and I can tell short stories."),
    ("Goodbye!", "Goodbye! Take care."),
)  # fmt: skip

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Keep your answers short.",
    "You answer questions clearly and kindly.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _animal_sentences(r: random.Random, a: Animal) -> list[str]:
    return [
        f"The {a.name} lives {a.home}.",
        f"A {a.name} likes to eat {a.food}.",
        f"A {a.trait} {a.name} can {a.ability}.",
        f"When it is happy, the {a.name} {a.sound}.",
        f"{_cap(a.plural)} are {a.trait} animals.",
        f"Most {a.plural} eat {a.food}.",
        f"You can often find {a.plural} {a.home}.",
        f"In {r.choice(SEASONS).name}, you can see {a.plural} {a.home}.",
    ]


def _story(r: random.Random, a: Animal) -> str:
    name = r.choice(NAMES)
    season = r.choice(SEASONS)
    friend = r.choice(ANIMALS)
    lines = [
        f"Once upon a time, a {a.trait} {a.name} lived {a.home}.",
        f"One {season.name} day, when the weather was {season.weather}, it met a {friend.name}.",
        f"The {friend.name} could {friend.ability}, and the {a.name} could {a.ability}.",
        f"They became good friends and shared {a.food}.",
        f"A child named {name} saw them and smiled.",
        f"From that day on, the {a.name} was never lonely again.",
    ]
    return " ".join(lines)


def plain_document(r: random.Random) -> str:
    """A short paragraph of prose about one topic, as a pretraining document."""
    kind = r.random()
    if kind < 0.45:
        a = r.choice(ANIMALS)
        sentences = _animal_sentences(r, a)
        r.shuffle(sentences)
        return " ".join(sentences[: r.randint(3, 6)])
    if kind < 0.6:
        return _story(r, r.choice(ANIMALS))
    if kind < 0.72:
        d = r.choice(DISHES)
        return (
            f"To make {d.name}, you need {d.ingredients}. First, {d.steps[0]}. "
            f"Then {d.steps[1]}. Many people eat {d.name} {d.meal}."
        )
    if kind < 0.82:
        s = r.choice(SEASONS)
        return (
            f"In {s.name}, the weather is {s.weather}. In {s.name}, {s.sight}. "
            f"It is a good time to {s.activity}."
        )
    if kind < 0.9:
        o = r.choice(SKY)
        return f"{o.fact} {o.detail}"
    if kind < 0.95:
        picks = r.sample(CAPITALS, 3)
        return " ".join(f"The capital of {c} is {city}." for c, city in picks)
    picks = r.sample(COLORS, 3)
    return " ".join(f"{_cap(t)} is {c}." for t, c in picks)


def _qa_pair(r: random.Random) -> tuple[str, str]:
    kind = r.random()
    if kind < 0.4:
        a = r.choice(ANIMALS)
        q = r.choice(
            [
                (f"What does a {a.name} eat?", f"A {a.name} eats {a.food}."),
                (f"What do {a.plural} eat?", f"{_cap(a.plural)} eat {a.food}."),
                (f"Where does a {a.name} live?", f"A {a.name} lives {a.home}."),
                (f"Where do {a.plural} live?", f"{_cap(a.plural)} live {a.home}."),
                (f"What sound does a {a.name} make?", f"A {a.name} {a.sound}."),
                (f"What can a {a.name} do?", f"A {a.name} can {a.ability}."),
                (
                    f"Tell me about {a.plural}.",
                    f"{_cap(a.plural)} are {a.trait} animals. They live {a.home} "
                    f"and eat {a.food}. A {a.name} can {a.ability}.",
                ),
                (f"Write a short story about a {a.name}.", _story(r, a)),
            ]
        )
        return q
    if kind < 0.55:
        d = r.choice(DISHES)
        return r.choice(
            [
                (
                    f"How do I make {d.name}?",
                    f"To make {d.name}, you need {d.ingredients}. First, {d.steps[0]}. "
                    f"Then {d.steps[1]}.",
                ),
                (f"What is in {d.name}?", f"{_cap(d.name)} is made with {d.ingredients}."),
                (f"When do people eat {d.name}?", f"Many people eat {d.name} {d.meal}."),
            ]
        )
    if kind < 0.67:
        s = r.choice(SEASONS)
        return r.choice(
            [
                (
                    f"What is the weather like in {s.name}?",
                    f"In {s.name}, the weather is {s.weather}.",
                ),
                (
                    f"What can I do in {s.name}?",
                    f"In {s.name}, you can {s.activity}. It is a lovely time of year.",
                ),
                (f"Describe {s.name}.", f"In {s.name}, {s.sight}. The weather is {s.weather}."),
            ]
        )
    if kind < 0.77:
        o = r.choice(SKY)
        return (f"Tell me about {o.name}.", f"{o.fact} {o.detail}")
    if kind < 0.85:
        c, city = r.choice(CAPITALS)
        return (f"What is the capital of {c}?", f"The capital of {c} is {city}.")
    if kind < 0.91:
        t, c = r.choice(COLORS)
        return (f"What color is {t}?", f"{_cap(t)} is {c}.")
    return r.choice(GREETINGS)


def chat_conversation(r: random.Random) -> list[dict[str, str]]:
    """One to three question-answer turns, sometimes with a system prompt."""
    messages: list[dict[str, str]] = []
    if r.random() < 0.25:
        messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
    for _ in range(r.choice((1, 1, 1, 2, 2, 3))):
        q, a = _qa_pair(r)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    return messages


@functools.cache
def _compiled_template() -> jinja2.Template:
    """Compiling costs far more than rendering; the corpus renders thousands of chats."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render with the shipped template, the way transformers and the API do."""
    return _compiled_template().render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        raise_exception=_raise,
    )


def _raise(message: str) -> None:
    raise ValueError(message)


COPY_WORDS = ("small", "green", "happy", "old", "bright", "quiet", "tall", "kind")


def copy_conversation(r: random.Random) -> list[dict[str, str]]:
    """A passage to repeat, or to repeat with one word replaced: the output repeats the
    input, the workload prompt-lookup speculation is for (benchmarks/spec_decode_bench.py)."""
    passage = plain_document(r)
    if r.random() < 0.5:
        return [
            {"role": "user", "content": f"Repeat this passage: {passage}"},
            {"role": "assistant", "content": passage},
        ]
    words = sorted({w for w in re.findall(r"[a-z]{4,}", passage)})
    old = r.choice(words) if words else "the"
    new = r.choice(COPY_WORDS)
    edited = re.sub(rf"\b{old}\b", new, passage)
    return [
        {"role": "user", "content": f"Replace {old} with {new} in this passage: {passage}"},
        {"role": "assistant", "content": edited},
    ]


def demo_corpus(
    seed: int, n: int, chat_fraction: float = 0.5, copy_fraction: float = 0.0
) -> list[str]:
    """``n`` training documents with their special tokens, ready to encode without adding any.

    Plain documents are ``<s>text</s>``; chat documents are full conversations rendered with
    ``CHAT_TEMPLATE``; ``copy_fraction`` of them (none by default, which leaves the corpus
    as it always was) are `copy_conversation`s. The same arguments always give the same list.
    """
    r = random.Random(seed)
    docs: list[str] = []
    for _ in range(n):
        if copy_fraction and r.random() < copy_fraction:
            docs.append(render_chat(copy_conversation(r)))
        elif r.random() < chat_fraction:
            docs.append(render_chat(chat_conversation(r)))
        else:
            docs.append(f"{BOS_TOKEN}{plain_document(r)}{EOS_TOKEN}")
    return docs
