"""More training instructions for the demo drafts, composed from templates and word lists written for
the project: the hand-written set (`data/train_prompts.json`) gives the drafts their variety of
phrasing, this one gives them many more contexts to learn the target's answers in. The mix is fixed
by its seed, never contains a held-out prompt, and has no duplicates.
"""
from __future__ import annotations

import random
from typing import Callable, Iterable, Sequence

CONCEPTS = (
    "photosynthesis", "gravity", "inflation", "democracy", "a black hole", "the water cycle", "evolution",
    "a vaccine", "climate change", "an ecosystem", "a volcano", "an earthquake", "electricity", "magnetism",
    "the immune system", "a budget", "compound interest", "a mortgage", "a stock market", "supply and demand",
    "recycling", "renewable energy", "a solar panel", "a wind turbine", "the internet", "a computer virus",
    "machine learning", "a database", "an algorithm", "encryption", "a password manager", "cloud storage",
    "a metaphor", "alliteration", "a haiku", "a paragraph", "a thesis statement", "a noun", "an adverb",
    "a fraction", "a prime number", "an average", "a percentage", "a right angle", "the Pythagorean theorem",
    "a calorie", "protein", "vitamin C", "sleep", "meditation", "friendship", "teamwork", "leadership",
    "a rainbow", "the tides", "the seasons", "an eclipse", "a comet", "the Milky Way", "the ozone layer",
    "a glacier", "a coral reef", "a rainforest", "a desert", "a river delta", "migration of birds",
    "the printing press", "the Roman Empire", "the Renaissance", "the Industrial Revolution", "the Olympic Games",
    "a museum", "a library", "a constitution", "an election", "taxes", "a minimum wage", "a trade deficit",
    "a hurricane", "fog", "a thermometer", "a microscope", "a telescope", "DNA", "a cell", "bacteria",
    "a food chain", "pollination", "composting", "a greenhouse", "irrigation", "a dam", "a bridge", "a skyscraper",
    "a search engine", "social media", "a podcast", "a blog", "a spreadsheet", "a web browser", "an operating system",
)
THINGS = (
    "dolphins", "owls", "honeybees", "octopuses", "penguins", "giraffes", "tigers", "ants", "wolves", "whales",
    "the Moon", "Mars", "Jupiter", "the Sun", "volcanoes", "the ocean", "mountains", "deserts", "forests", "rivers",
    "chocolate", "coffee", "tea", "bread", "cheese", "rice", "honey", "apples", "potatoes", "tomatoes",
    "bicycles", "trains", "airplanes", "ships", "cars", "rockets", "clocks", "books", "pianos", "guitars",
    "Paris", "Tokyo", "Egypt", "the Amazon river", "Antarctica", "the Sahara", "Iceland", "Australia", "Canada",
    "the Eiffel Tower", "the pyramids", "castles", "lighthouses", "trees", "mushrooms", "sharks", "butterflies",
)
TASKS = (
    "make a cup of tea", "bake simple bread", "boil an egg", "plant tomatoes", "care for a houseplant",
    "start running", "learn a new language", "write a cover letter", "prepare for a job interview",
    "save money each month", "make a weekly budget", "organize my closet", "clean a kitchen quickly",
    "fall asleep faster", "drink more water", "study for an exam", "take better notes", "give a short speech",
    "change a flat bicycle tire", "wash a wool sweater", "remove a coffee stain", "pack for a weekend trip",
    "make friends in a new city", "learn to draw", "start a journal", "train a puppy to sit", "read faster",
    "stay focused while working from home", "prepare a healthy lunch", "make a fruit smoothie",
    "set up a home workout", "reduce screen time", "write a thank-you note", "plan a birthday party",
    "choose a laptop", "back up my photos", "create a strong password", "learn to type faster",
    "build a campfire safely", "start a small vegetable garden", "make homemade pizza", "cook pasta",
    "keep a conversation going", "handle stress before a test", "become a better listener", "manage my time",
)
SUBJECTS = (
    "the ocean at night", "a snowy morning", "an old bookshop", "a busy train station", "the first day of spring",
    "a lonely lighthouse", "autumn leaves", "a summer thunderstorm", "a quiet library", "a cat by the window",
    "a mountain sunrise", "the city at midnight", "a garden after rain", "a forgotten key", "a paper boat",
    "a kite in the wind", "a cup of coffee", "the last day of school", "a grandmother's kitchen", "a full moon",
    "a desert road", "a field of sunflowers", "a foggy harbor", "the sound of the sea", "an empty playground",
)
CHARACTERS = (
    "a young inventor", "a shy robot", "an old fisherman", "a curious fox", "a lost puppy", "a brave knight",
    "a girl who can talk to birds", "a boy who collects stones", "a retired astronaut", "a clumsy wizard",
    "a baker who never sleeps", "a tiny dragon", "a detective cat", "a lonely giant", "a forgetful pirate",
)
EVENTS = (
    "finds a secret door", "wins a strange contest", "gets lost in a forest", "discovers a hidden map",
    "meets a talking tree", "builds a flying machine", "must save the village", "loses their shadow",
    "opens a mysterious letter", "travels back in time", "learns to make friends", "finds a message in a bottle",
)
BUSINESSES = (
    "a coffee shop", "a bike repair shop", "a bakery", "a dog grooming salon", "a flower shop", "a bookstore",
    "a yoga studio", "a food truck", "a toy store", "a language school", "a pizza restaurant", "a car wash",
)
SENTENCES = (
    "The meeting has been moved to Thursday at three.", "Please remember to bring your own water bottle.",
    "I would like to order a vegetable soup and some bread.", "The library closes early on Fridays.",
    "Our team finished the project two days ahead of schedule.", "Where is the nearest train station?",
    "The weather will be sunny and warm tomorrow.", "My brother is learning to play the guitar.",
    "Thank you for your help with the move.", "Can we meet at the park after lunch?",
)
LANGUAGES = ("Spanish", "French", "German", "Italian", "Portuguese")
TONES = ("friendlier", "more formal", "more concise", "more exciting", "more polite")
PAIRS = (
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("summer", "winter"), ("books", "movies"),
    ("walking", "running"), ("cities", "villages"), ("email", "phone calls"), ("renting", "buying a home"),
    ("a laptop", "a tablet"), ("weather", "climate"), ("a virus", "bacteria"), ("a lake", "a sea"),
    ("a frog", "a toad"), ("a crocodile", "an alligator"), ("baking", "frying"), ("saving", "investing"),
)
CLASSES = (
    ("mammals or birds", "eagle, cow, sparrow, horse, parrot, rabbit"),
    ("fruits or vegetables", "apple, lettuce, cherry, onion, pear, cucumber"),
    ("countries or cities", "Peru, Berlin, Ghana, Toronto, Vietnam, Madrid"),
    ("solids or liquids", "ice, milk, stone, juice, wood, oil"),
    ("hot or cold drinks", "lemonade, cocoa, iced tea, soup, espresso, smoothie"),
    ("planets or stars", "Venus, Sirius, Saturn, Vega, Mercury, Betelgeuse"),
    ("nouns or verbs", "run, table, jump, river, write, garden"),
)
PYTHON_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the largest number in a list",
    "counts the vowels in a word", "removes duplicates from a list", "converts Celsius to Fahrenheit",
    "checks whether a word is a palindrome", "sums the even numbers in a list", "sorts a list of names",
    "returns the average of a list of numbers", "merges two dictionaries", "finds the longest word in a sentence",
)
PYTHON_FEATURES = ("a list comprehension", "the 'with' statement", "a dictionary", "a for loop", "a tuple",
                   "the 'len' function", "a lambda", "an exception", "a class", "the 'import' statement")
IMAGE_QUESTIONS = (
    "Describe this image in detail.", "What is the main subject of this picture?", "What colors stand out here?",
    "Write a short poem inspired by this image.", "What mood does this picture create?",
    "Give this photograph a title.", "Write a caption for this image.", "What might happen next in this scene?",
    "List three words that describe this picture.", "Where do you think this photo was taken?",
    "Write a short story that begins with this picture.", "What would you like to ask about this image?",
    "Explain this image to a child.", "What details do you notice in the background?",
)
NAMES = ("Maya", "Tom", "Aisha", "Leo", "Sara", "Ben", "Nina", "Omar", "Lucy", "Ravi")
ITEMS = ("apples", "stickers", "marbles", "books", "cookies", "pencils")


def _templated() -> Iterable[str]:
    for c in CONCEPTS:
        yield from (f"What is {c}?", f"Explain {c} in simple terms.", f"Why does {c} matter?",
                    f"Explain {c} to a ten-year-old.", f"Give a short summary of {c} with one example.",
                    f"Write a quiz question about {c}, with its answer.")
    for t in THINGS:
        yield from (f"Tell me three interesting facts about {t}.", f"Write a short paragraph about {t}.",
                    f"What are some common myths about {t}?", f"Write a short poem about {t}.",
                    f"Write a riddle about {t}.")
    for t in TASKS:
        yield from (f"How do I {t}?", f"What are the steps to {t}?", f"Give me five tips to {t}.",
                    f"What mistakes should I avoid when I {t}?", f"Explain to a beginner how to {t}.")
    for s in SUBJECTS:
        yield from (f"Write a short poem about {s}.", f"Write a haiku about {s}.", f"Describe {s} in vivid detail.",
                    f"Write a short story inspired by {s}.")
    for c in CHARACTERS:
        for e in EVENTS:
            yield f"Write a short story about {c} who {e}."
    for b in BUSINESSES:
        yield from (f"Write a slogan for {b}.", f"Give me name ideas for {b}.",
                    f"Write a short advertisement for {b}.", f"How can {b} attract more customers?")
    for s in SENTENCES:
        yield from [f'Translate into {lang}: "{s}"' for lang in LANGUAGES]
        yield from [f'Rewrite this sentence to sound {tone}: "{s}"' for tone in TONES]
    for a, b in PAIRS:
        yield from (f"Compare {a} and {b}.", f"What is the difference between {a} and {b}?",
                    f"What are the pros and cons of {a} compared with {b}?")
    for kinds, items in CLASSES:
        yield f"Classify these as {kinds}: {items}."
    for t in PYTHON_TASKS:
        yield from (f"Write a Python function that {t}.", f"Explain how to write a Python function that {t}.")
    for f in PYTHON_FEATURES:
        yield from (f"What is {f} in Python? Show an example.", f"When should I use {f} in Python?")


def _word_problems(rng: random.Random, count: int) -> Iterable[str]:
    for _ in range(count):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(3, 60), rng.randint(2, 40), rng.randint(2, 9)
        yield rng.choice((
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"{name} has {a * c} {item} and shares them equally among {c} friends. How many does each friend get?",
            f"A shop sells {item} at {c} dollars each. How much do {b} {item} cost?",
            f"{name} reads {a} pages a day. How many pages does {name} read in {c} weeks?",
            f"A train leaves at {c}:{rng.choice(('05', '15', '30', '45'))} and the trip takes {b} minutes. "
            "When does it arrive?",
        ))


def composed_prompts(count: int, exclude: Sequence[str], photos: Sequence[str], image_share: float = 0.25,
                     seed: int = 0) -> list[dict]:
    """`count` distinct prompts ({"prompt", "image"?}) in a fixed shuffled order, none in `exclude`;
    about `image_share` of them are image questions about one of `photos`."""
    return compose(_templated(), _word_problems, 400, IMAGE_QUESTIONS, count, exclude, photos, image_share, seed,
                   "the prompt mix")


def compose(templated: Iterable[str], problems: Callable[[random.Random, int], Iterable[str]], n_problems: int,
            image_questions: Sequence[str], count: int, exclude: Sequence[str], photos: Sequence[str],
            image_share: float, seed: int, what: str) -> list[dict]:
    """A mix: the templated texts, `n_problems` drawn problems, (question, photo) pairs; see shuffled_mix."""
    rng = random.Random(seed)
    texts = list(dict.fromkeys(templated)) + list(dict.fromkeys(problems(rng, n_problems)))
    return shuffled_mix(texts, image_questions, count, exclude, photos, image_share, rng, what)


def shuffled_mix(texts: Sequence[str], image_questions: Sequence[str], count: int, exclude: Sequence[str],
                 photos: Sequence[str], image_share: float, rng: random.Random, what: str) -> list[dict]:
    """`count` prompts: distinct `texts` and (question, photo) pairs not in `exclude`, shuffled by `rng`,
    about `image_share` of them with a photo."""
    banned = set(exclude)
    texts = [t for t in dict.fromkeys(texts) if t not in banned]
    images = [{"prompt": q, "image": p} for q in image_questions for p in photos if q not in banned]
    rng.shuffle(texts)
    rng.shuffle(images)
    n_images = min(len(images), round(count * image_share))
    n_texts = min(len(texts), count - n_images)
    if n_texts + n_images < count:
        raise ValueError(f"{what} has only {len(texts)} text and {len(images)} image prompts, {count} asked for")
    out = [{"prompt": t} for t in texts[:n_texts]] + images[:n_images]
    rng.shuffle(out)
    return out
