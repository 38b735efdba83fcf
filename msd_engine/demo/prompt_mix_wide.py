"""A second composed mix of training instructions for the demo drafts, on subjects and in phrasings
the first mix (`prompt_mix.py`) does not have: word meanings, recipes, sports, jobs, cities, emails,
summaries and sentiment of short texts written here, percent / unit / area problems, everyday
Python, lists, what-ifs, grammar fixes, and new questions about the photographs.

Why a second mix: with the first two sets the drafts reached tau 3.1 on training prompts but 2.7 on
held-out ones, so they needed more varied contexts rather than more epochs. Like the first mix it is
fixed by its seed, has no duplicates, and never repeats a hand-written, held-out or first-mix prompt.
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence

from msd_engine.demo.prompt_mix import compose

WORDS = (
    "resilient", "ambiguous", "meticulous", "serendipity", "procrastinate", "empathy", "frugal", "candid",
    "eloquent", "tedious", "vivid", "humble", "obsolete", "diligent", "curious", "generous", "fragile",
    "gregarious", "ephemeral", "pragmatic", "skeptical", "optimistic", "reluctant", "spontaneous",
    "abundant", "anxious", "benevolent", "cautious", "clarify", "collaborate", "compromise", "consequence",
    "contradict", "deadline", "dilemma", "enthusiasm", "evidence", "feasible", "habitat", "hypothesis",
    "incentive", "inevitable", "innovation", "integrity", "jargon", "landmark", "leisure", "melancholy",
    "negotiate", "nuance", "perspective", "priority", "routine", "scarce", "sustainable", "tradition",
    "versatile", "wander", "whimsical", "wisdom",
)
DISHES = (
    "pancakes", "tomato soup", "fried rice", "guacamole", "a vegetable curry", "banana bread", "lemonade",
    "a Greek salad", "scrambled eggs", "oatmeal cookies", "hummus", "mashed potatoes", "a grilled cheese sandwich",
    "chili", "apple pie", "fresh salsa", "a stir-fry with tofu", "pumpkin soup", "French toast", "a fruit salad",
    "lentil soup", "spaghetti with garlic and oil", "roasted vegetables", "chicken noodle soup", "a chocolate cake",
    "potato salad", "a simple omelette", "rice pudding", "popcorn", "iced coffee",
)
SPORTS = (
    "tennis", "basketball", "swimming", "chess", "volleyball", "cycling", "rock climbing", "table tennis",
    "badminton", "skiing", "surfing", "golf", "baseball", "cricket", "ice hockey", "archery", "rowing",
    "yoga", "karate", "bowling", "skateboarding", "marathon running", "handball", "fencing", "hiking",
)
JOBS = (
    "nurse", "software engineer", "pilot", "architect", "electrician", "librarian", "chef", "firefighter",
    "veterinarian", "journalist", "teacher", "dentist", "farmer", "photographer", "plumber", "pharmacist",
    "graphic designer", "accountant", "translator", "park ranger", "police officer", "mechanic",
    "marine biologist", "data analyst", "carpenter", "museum curator", "flight attendant", "social worker",
    "game designer", "beekeeper", "tailor", "surgeon", "barista", "astronomer", "lawyer", "gardener",
    "bus driver", "physical therapist", "event planner", "web developer",
)
FEELINGS = (
    "nervous before a presentation", "bored on a rainy weekend", "overwhelmed by homework", "lonely after moving",
    "unmotivated to exercise", "stressed about money", "angry at a friend", "tired all the time",
    "worried about a job interview", "stuck on a hard problem", "homesick", "jealous of a coworker",
    "afraid of making mistakes", "sad after a pet died", "frustrated with slow progress", "shy at parties",
    "distracted by my phone", "anxious about flying", "nervous about a first day at school",
    "discouraged after failing a test", "restless at night", "burned out at work", "impatient in traffic",
    "embarrassed after a mistake", "uncertain about my career",
)
SCIENCE_QUESTIONS = (
    "Why is the sky blue?", "Why do leaves change color in autumn?", "Why does ice float on water?",
    "Why do we have leap years?", "Why does the Moon have phases?", "Why do cats purr?", "Why is the sea salty?",
    "Why do onions make people cry?", "Why do we yawn?", "Why do stars twinkle?", "Why does bread rise?",
    "Why do birds fly south for the winter?", "Why is snow white?", "Why do we dream?",
    "Why do metal spoons feel colder than wooden ones?", "Why does thunder follow lightning?",
    "Why do our fingers wrinkle in water?", "Why do zebras have stripes?", "Why do planes leave white trails?",
    "Why do we get goosebumps?", "How do bees make honey?", "How does a rainbow form?", "How do fish breathe?",
    "How does a compass work?", "How do plants drink water?", "How does a refrigerator keep food cold?",
    "How do airplanes stay in the air?", "How does soap clean dirt?", "How do vaccines train the body?",
    "How does a battery store energy?", "How do chameleons change color?", "How is glass made?",
    "How does the heart pump blood?", "How do caterpillars turn into butterflies?", "How are mountains formed?",
    "How does a microwave oven heat food?", "How do bats find their way in the dark?", "How is paper made?",
    "How do submarines dive and rise?", "How does the body fight a cold?", "What makes a desert a desert?",
    "What causes wind?", "What causes the seasons to change?", "What happens to the body when we sleep?",
    "What makes popcorn pop?", "What is inside the Earth?", "What makes a diamond so hard?",
    "What causes a sunburn?", "What is static electricity?", "What happens when a star dies?",
)
CITIES = (
    "Rome", "Cairo", "New York", "Sydney", "Rio de Janeiro", "Istanbul", "Kyoto", "Barcelona", "Amsterdam",
    "Mexico City", "Cape Town", "Vancouver", "Seoul", "Bangkok", "Prague", "Vienna", "Lisbon", "Dublin",
    "Buenos Aires", "Mumbai", "Singapore", "Stockholm", "Marrakesh", "Athens", "Edinburgh", "Havana",
    "Budapest", "Nairobi", "Lima", "Copenhagen", "Hanoi", "Chicago", "San Francisco", "Florence", "Oslo",
    "Helsinki", "Montreal", "Jerusalem", "Beijing", "Reykjavik",
)
RECIPIENTS = ("my teacher", "my manager", "a customer", "a colleague", "my neighbor", "a hotel", "a client",
              "the school principal", "my sports coach", "a new team member", "the city council", "my professor")
PURPOSES = (
    "asking for a meeting next week", "thanking them for their help", "apologizing for a late reply",
    "asking for more information about a project", "asking to move our appointment to Friday",
    "explaining that I will be absent tomorrow", "sharing good news about our results",
    "asking for feedback on my work", "confirming the date of an event", "introducing myself",
    "reminding them about an unpaid invoice", "inviting them to a small celebration",
)
PASSAGES = (
    "Omar missed the last bus home. He called his sister, who drove across town to pick him up. On the way they "
    "stopped for noodles and laughed about the long day.",
    "The town library started lending tools as well as books. Neighbors borrowed drills, ladders and garden "
    "shears. Within a year the library had twice as many visitors.",
    "Mia practiced the violin for twenty minutes every morning. At first the notes sounded scratchy. After six "
    "months she played a full piece at the school concert.",
    "A storm knocked out the power in the village for two days. People shared candles, cooked on camping stoves "
    "and gathered in the square to tell stories.",
    "The bakery on the corner began giving its unsold bread to a shelter each evening. Other shops soon did the "
    "same with fruit and vegetables.",
    "Jonas wanted to run a marathon but could barely run a mile. He followed a training plan, rested when he was "
    "sore, and finished the race in just under five hours.",
    "Scientists tagged a group of sea turtles to follow their journeys. One turtle swam more than ten thousand "
    "kilometers before returning to the beach where it hatched.",
    "A class of students planted trees along a dusty road near their school. Three summers later the road was "
    "shaded and cooler, and birds nested in the branches.",
    "Priya lost her phone on a train. A stranger found it, called her mother from the contacts, and met Priya at "
    "the station the next morning to return it.",
    "The small museum had few visitors until it opened a room where children could touch old tools and clothes. "
    "Families started coming every weekend.",
    "After years of using a car for every trip, Sam bought a bicycle. He saved money on fuel, slept better and "
    "discovered parks he had never noticed.",
    "Two friends started a podcast about local history. They interviewed older residents, and the episodes "
    "became a record of stories that might have been forgotten.",
    "A farmer noticed fewer bees in her fields. She planted wildflowers along the edges, and the next year her "
    "apple harvest was the best in a decade.",
    "The company let employees work from home two days a week. Fewer people were late, and the office used less "
    "energy, but some teams missed talking in person.",
    "Leo forgot his lines halfway through the school play. His friend whispered the next words, the audience "
    "never noticed, and Leo finished the scene with a smile.",
    "A heavy snowfall closed the roads into the mountain village. The residents cleared paths together and "
    "delivered food to older neighbors who could not leave home.",
    "Rosa kept a jar of coins by the door. Every time she walked instead of taking a taxi, she added the fare. By "
    "the end of the year she had enough for a trip to the coast.",
    "The river through the city was once too polluted for fish. After a long cleanup, otters returned and "
    "people began to swim there again in summer.",
    "A software team kept missing deadlines. They started meeting for ten minutes each morning to share "
    "problems early, and their next release came out on time.",
    "An old lighthouse keeper wrote down the weather every day for forty years. His notebooks now help "
    "scientists understand how the coast's climate has changed.",
)
MESSAGES = (
    "The hotel room was clean, the staff were friendly, and breakfast was delicious.",
    "My package arrived two weeks late and the box was crushed.", "The movie was fine, nothing special.",
    "I can't believe how easy this app is to use. I love it!", "The instructions were confusing and incomplete.",
    "Service was slow, but the pizza made up for it.", "This is the third time my order has been wrong.",
    "The concert was louder than I expected, but the band was amazing.", "The shoes fit well and look great.",
    "I waited on hold for forty minutes and nobody answered.", "The museum was okay, though a bit small.",
    "Best coffee in town, and the barista remembered my name!", "The battery dies after only two hours.",
    "The course was well organized and the teacher explained everything clearly.",
    "The train was on time, as usual.", "The soup was cold and far too salty.",
    "What a wonderful surprise party, thank you all so much!", "The price went up again without any warning.",
    "The park is nice, but there are never enough benches.", "I'm not sure yet whether I like the new design.",
    "Our guide was funny, patient and knew so much about the city.", "The laptop keeps freezing when I open two tabs.",
    "Delivery was quick and everything was packed carefully.", "The book started slowly but the ending was brilliant.",
    "The gym is crowded every evening and half the machines are broken.",
)
PYTHON_HOWTOS = (
    "read a text file line by line", "split a string into words", "sort a dictionary by its values",
    "count how often each item appears in a list", "join a list of strings with commas", "get the current date",
    "generate a random number between 1 and 10", "write a list of numbers to a file", "check the type of a variable",
    "loop over a list with its index", "combine two lists into pairs", "convert a string to an integer safely",
    "remove spaces from the start and end of a string", "find the position of an item in a list",
    "make a copy of a list", "create a list of squares", "reverse a list", "round a number to two decimals",
    "replace a word in a string", "read a CSV file", "measure how long a piece of code takes",
    "handle a missing file without crashing", "define a function with a default argument",
    "check whether a list is empty", "flatten a list of lists",
)
PYTHON_CONCEPTS = (
    "a generator", "a set", "a decorator", "a module", "list slicing", "an f-string", "recursion", "a while loop",
    "the 'break' statement", "a virtual environment", "type hints", "the 'enumerate' function", "a docstring",
    "the difference between a list and a tuple", "the 'None' value", "an 'if __name__ == \"__main__\"' block",
    "keyword arguments", "a global variable", "string formatting", "unit tests",
)
LIST_TOPICS = (
    "things to pack for a beach day", "ways to save energy at home", "healthy snacks for work",
    "questions to ask at the end of a job interview", "board games for a family evening",
    "ways to make a small room look bigger", "easy plants for beginners", "habits of good students",
    "things to do on a long train journey", "ways to reduce food waste", "safety tips for cycling in a city",
    "signs that a houseplant needs water", "ideas for a rainy afternoon with kids", "skills every cook should learn",
    "things to check before buying a used car", "ways to be kind to a new neighbor", "uses for an old jar",
    "ways to practice a new language every day", "items for a first aid kit", "tips for taking better photos",
    "ways to stay cool in hot weather", "good topics for a school presentation", "ways to celebrate a friend",
    "reasons to learn to swim", "things a camping trip needs", "ways to make a morning less rushed",
    "famous inventions of the last century", "animals that live in the Arctic", "fruits that are high in vitamin C",
    "ways to keep a phone battery healthy", "qualities of a good friend", "ideas for a small garden",
    "questions to ask a doctor", "ways to stay safe online", "tips for writing a clear email",
    "things to do in the first week at a new job", "ways to relax after work", "inexpensive date ideas",
    "exercises that need no equipment", "tips for a long drive",
)
WHAT_IFS = (
    "the Moon disappeared", "humans could breathe underwater", "it never rained again", "everyone spoke the same language",
    "cars could fly", "animals could talk", "the internet stopped working for a week", "we had no electricity",
    "the Earth spun twice as fast", "people lived for two hundred years", "there were no bees", "money did not exist",
    "every day was sunny", "we could read each other's thoughts", "the oceans were fresh water",
    "schools had no homework", "nobody needed to sleep", "the Sun became twice as bright", "plants could walk",
    "we could photosynthesize like plants", "there was no gravity for a day", "all the ice on Earth melted",
    "dinosaurs had never gone extinct", "the week had only five days", "books had never been invented",
)
BAD_SENTENCES = (
    "She don't like apples.", "Me and him goes to school together.", "Their going to the park tomorrow.",
    "I has finished my homework yesterday.", "The dogs is barking all night.", "He runned to the store.",
    "We was happy with the results.", "Its a beautiful day isnt it", "She can sings very well.",
    "There is many reasons to stay.", "I seen that movie last week.", "The informations are wrong.",
    "He don't know nothing about it.", "Who's book is this?", "The team have win the match.",
    "I am agree with you.", "She go to work by bus every days.", "They was late because of the rain.",
    "Less people came than we expected.", "Between you and I, the plan is risky.",
)
PRODUCTS = (
    "a reusable water bottle", "noise-cancelling headphones", "a wooden chess set", "a solar-powered lamp",
    "a smart watch", "a hiking backpack", "a handmade candle", "a standing desk", "an electric kettle",
    "a yoga mat", "a travel umbrella", "a coffee grinder", "a children's picture book", "a bicycle helmet",
    "a houseplant kit", "a wireless keyboard", "a picnic basket", "a winter jacket", "a board game", "running shoes",
)
DIALOGUES = (
    ("a customer", "a shop assistant"), ("a teacher", "a student"), ("a doctor", "a patient"),
    ("two old friends", None), ("a tourist", "a local"), ("a robot", "a child"), ("a chef", "a food critic"),
    ("a cat", "a dog"), ("an astronaut", "mission control"), ("a job candidate", "an interviewer"),
    ("a grandparent", "a grandchild"), ("a pilot", "a passenger"),
)
PAIRS = (
    ("a hurricane", "a tornado"), ("a city", "a town"), ("a poem", "a song"), ("a crocodile", "a lizard"),
    ("a violin", "a cello"), ("jam", "jelly"), ("a moth", "a butterfly"), ("a lake", "a pond"),
    ("a rabbit", "a hare"), ("soccer", "rugby"), ("a mountain", "a hill"), ("a debit card", "a credit card"),
    ("an app", "a website"), ("a novel", "a short story"), ("weather", "season"), ("a meteor", "an asteroid"),
    ("a bakery", "a pastry shop"), ("a cold", "the flu"), ("speed", "velocity"), ("a hobby", "a job"),
    ("a diary", "a blog"), ("a sea", "an ocean"), ("a shower", "a bath"), ("e-books", "paper books"),
    ("a river", "a canal"),
)
TOPICS = (
    "the human brain", "the solar system", "honey bees", "the history of chocolate", "the first airplanes",
    "the rainforest", "sharks", "the pyramids of Giza", "volcanoes", "the invention of the telephone",
    "the Great Wall of China", "the life of a tree", "the deep sea", "Antarctic penguins", "the history of money",
    "wind energy", "the moon landing", "clouds", "the Silk Road", "ancient Greece", "the human skeleton",
    "tea around the world", "the history of the bicycle", "coral", "trains in history", "the Arctic fox",
    "the Vikings", "the Nile", "music in ancient times", "the history of writing", "earthworms", "hummingbirds",
    "the Amazon rainforest", "the history of the Olympics", "glaciers", "the first computers", "owls at night",
    "salt", "the history of maps", "the Milky Way",
)
IMAGE_QUESTIONS = (
    "What stands out most in this image?", "Describe this picture in three sentences.",
    "What time of day do you think it is in this photo?", "Write a haiku about this picture.",
    "If this photo were on a postcard, what would the message on the back say?",
    "What questions would a scientist ask about this image?", "Describe the textures you can see here.",
    "Write a short advertisement that uses this image.", "What sounds might you hear if you were here?",
    "Describe this image to someone who cannot see it.", "What is happening in the foreground?",
    "Write a tweet about this photo.", "What could this picture be used to teach?",
    "Invent a name for the place or object in this picture.", "What is unusual about this image?",
    "Write two sentences about this photo: one serious and one funny.", "Summarize this picture in one sentence.",
    "What would a child notice first in this picture?", "Write a diary entry about the day this photo was taken.",
    "What emotions does this picture bring to mind?", "How would you improve this photograph?",
    "Suggest three hashtags for this picture.", "What story could this image illustrate?",
    "Describe the shapes and patterns in this picture.", "Is this picture calm or busy? Explain.",
    "Write a riddle whose answer is in this picture.", "What season does this picture remind you of, and why?",
    "Write the opening line of a novel inspired by this photo.", "Explain what this picture shows to a tourist.",
    "What could be just outside the frame of this photo?",
)
NAMES = ("Ana", "Kenji", "Fatima", "Hugo", "Zoe", "Ivan", "Mei", "Carlos", "Elena", "Sam", "Noah", "Amara")


def _templated() -> Iterable[str]:
    for w in WORDS:
        yield from (f'What does the word "{w}" mean?', f'Use the word "{w}" in three different sentences.',
                    f'Give a synonym and an antonym for "{w}".')
    for d in DISHES:
        yield from (f"Give me a simple recipe for {d}.", f"What ingredients do I need for {d}?",
                    f"How can I make {d} healthier?")
    for s in SPORTS:
        yield from (f"Explain the basic rules of {s}.", f"What do I need to start {s}?",
                    f"What are the health benefits of {s}?")
    for j in JOBS:
        yield from (f"What does a {j} do on a typical day?", f"What skills does a {j} need?",
                    f"Write a short job advertisement for a {j}.")
    for f in FEELINGS:
        yield from (f"What can I do when I feel {f}?", f"My friend feels {f}. How can I help?")
    yield from SCIENCE_QUESTIONS
    for c in CITIES:
        yield from (f"What is {c} known for?", f"Plan a one-day visit to {c}.", f"Write a short poem about {c}.")
    for r in RECIPIENTS:
        for p in PURPOSES:
            yield f"Write a short email to {r} {p}."
    for t in PASSAGES:
        yield from (f'Summarize this in one sentence: "{t}"', f'What is the main idea of this text? "{t}"',
                    f'Give this short text a title: "{t}"')
    for m in MESSAGES:
        yield from (f'Classify the sentiment of this review: "{m}"',
                    f'Is this message positive, negative or neutral? "{m}"')
    for h in PYTHON_HOWTOS:
        yield from (f"How do I {h} in Python?", f"Show me Python code to {h}.")
    for c in PYTHON_CONCEPTS:
        yield from (f"Explain {c} in Python with a short example.", f"What is a common mistake with {c} in Python?")
    for t in LIST_TOPICS:
        yield from (f"List five {t}.", f"Name three {t} and explain each briefly.")
    for w in WHAT_IFS:
        yield f"What would happen if {w}?"
    for s in BAD_SENTENCES:
        yield from (f'Correct the grammar in this sentence: "{s}"', f'What is wrong with this sentence? "{s}"')
    for p in PRODUCTS:
        yield from (f"Write a product description for {p}.", f"Who would buy {p}, and why?")
    for a, b in DIALOGUES:
        yield f"Write a short dialogue between {a}." if b is None else f"Write a short dialogue between {a} and {b}."
    for a, b in PAIRS:
        yield from (f"How is {a} different from {b}?", f"What do {a} and {b} have in common?")
    for t in TOPICS:
        yield from (f"Tell me about {t}.", f"Write three quiz questions about {t}.", f"What is surprising about {t}?",
                    f"Write a short lesson for children about {t}.")


def _number_problems(rng: random.Random, count: int) -> Iterable[str]:
    for _ in range(count):
        name = rng.choice(NAMES)
        a, b, p = rng.randint(12, 480), rng.randint(2, 25), rng.choice((5, 10, 15, 20, 25, 30, 40, 50))
        yield rng.choice((
            f"A jacket costs ${a} and is on sale for {p} percent off. What is the sale price?",
            f"What is {p} percent of {a}?",
            f"{name} earns ${a} a week and saves {p} percent of it. How much does {name} save in {b} weeks?",
            f"Convert {a} centimeters to meters.",
            f"How many minutes are in {b} hours and {a % 60} minutes?",
            f"A rectangle is {b} meters wide and {a % 40 + 3} meters long. What are its area and perimeter?",
            f"A car drives {a} kilometers in {b % 6 + 2} hours. What is its average speed?",
            f"{name} buys {b} notebooks at ${a % 9 + 1} each and pays with a $100 bill. How much change is left?",
            f"A recipe needs {b % 5 + 2} eggs for {b % 4 + 2} people. How many eggs for {b % 4 + 2 + b % 7 + 3} people?",
            f"A tank holds {a} liters and is {p} percent full. How many liters are in it?",
            f"{name} was born in {1950 + a % 70}. How old will {name} be in {2030 + b}?",
            f"Round {a}.{b:02d} to the nearest whole number and explain how you did it.",
        ))


def wide_prompts(count: int, exclude: Sequence[str], photos: Sequence[str], image_share: float = 0.2,
                 seed: int = 0) -> list[dict]:
    """`count` distinct prompts ({"prompt", "image"?}) in a fixed shuffled order, none in `exclude`;
    about `image_share` of them are new questions about one of `photos`."""
    return compose(_templated(), _number_problems, 900, IMAGE_QUESTIONS, count, exclude, photos, image_share, seed,
                   "the wide prompt mix")
