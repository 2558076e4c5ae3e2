"""Human-written reference answers for the general (instruction-following) task: the style anchors.

GLM-5 (report section 3.4) adds "expert human responses as stylistic and qualitative anchors" to general RL,
because model-only optimisation drifts toward "verbose, formulaic" answers. These sentences were written by hand
for this project (not generated, not copied): short, concrete, one image each, no filler, no repetition. They are
the style the reward models learn to prefer (rewards.py), the reference the generative reward model reads, and
the supervised answers of the general task (tasks.py transforms their casing and punctuation to fit a prompt's
constraints; the words stay as written).

``degrade`` makes the worse answers the reward models learn to rank below them, one kind of flaw at a time, each
with the score a careful reader would give it (0-9): repetition, filler words, formulaic templates, an answer
about another topic, verbose padding, truncation. The flaws are the ones the paper names (verbose, formulaic)
plus the classic ways a small model fails.
"""

from __future__ import annotations

import random

ANCHORS: dict[str, list[str]] = {
    "rain": ["Rain hushes everything.", "Wet streets shine silver.", "Puddles swallow the grey sky.",
             "Rain drums softly on tin roofs.", "Warm summer rain smells of dusty earth."],
    "the sea": ["Waves fold endlessly.", "Salt wind stings lips.", "Gulls argue above the harbour.",
                "The tide erases every footprint overnight.", "Cold green water hides a hundred shipwrecks."],
    "a cat": ["Cats distrust doors.", "Whiskers twitch at moths.", "A cat guards the windowsill.",
              "She folds her paws like bread.", "The old cat purrs louder than the kettle."],
    "coffee": ["Coffee first, words later.", "Coffee steams in chipped mugs.", "Bitter warmth wakes slow mornings.",
               "Fresh beans crackle in the grinder.", "The last cold sip tastes of regret."],
    "winter": ["Frost laces windows.", "Breath hangs in the air.", "Winter nights arrive before supper.",
               "Snow boots line the hallway in rows.", "Bare trees scratch at a pale sky."],
    "a library": ["Shelves hold borrowed worlds.", "Old pages smell of vanilla.", "Whispers drift between tall shelves.",
                  "Silence here feels gentle, not empty.", "A librarian stamps due dates with care."],
    "the moon": ["Full moon, long shadows.", "The moon silvers rooftops.", "Tides obey its slow pull.",
                 "A thin moon hooks the clouds.", "Moonlight makes the field look frozen."],
    "bread": ["Crust crackles.", "Warm bread fogs the window.", "Flour dusts the baker's sleeves.",
              "Dough rises while the house sleeps.", "Bread tastes best when torn by hand."],
    "a river": ["Cold water, smooth pebbles.", "The river carries fallen leaves.", "Stones shine under moving water.",
                "Herons wait where the current slows.", "Every spring the river forgets its banks."],
    "music": ["Music fills empty kitchens.", "Drums keep the room breathing.", "A cello hums beneath the melody.",
              "Notes hang in the warm air.", "One song can carry a whole summer."],
    "a garden": ["Mint escapes every pot.", "Bees stitch the lavender rows.", "Tomatoes blush on tangled vines.",
                 "Snails leave silver trails across stones.", "Weeds return faster than any gardener's patience."],
    "the city": ["Sirens braid through traffic.", "The city never quite sleeps.", "Crowds pour out of the subway.",
                 "Neon signs flicker above wet pavement.", "Pigeons claim every bench at noon."],
    "a dog": ["Dogs greet doors loudly.", "Old dogs nap in sunbeams.", "The puppy chases its own echo.",
              "Her tail thumps the kitchen floor.", "A muddy dog shakes itself by the door."],
    "autumn": ["Leaves crunch underfoot.", "Evenings shorten, sweaters return.", "Maple trees burn orange and red.",
               "Autumn smells of smoke and apples.", "Geese stitch their way south across the sky."],
    "a train": ["Tickets punched, windows fogged.", "The train sways through tunnels.", "Night trains rock passengers asleep.",
                "Fields blur past the carriage window.", "A whistle echoes across the sleeping valley."],
    "snow": ["Snow muffles the street.", "Fresh snow squeaks under boots.", "Flakes melt on warm eyelashes.",
             "Children carve angels in the drifts.", "Snow turns every streetlight into a lantern."],
    "the forest": ["Owls call after dusk.", "Pines whisper in the wind.", "Moss softens every fallen log.",
                   "Ferns unroll beside the trail.", "Sunlight falls through in narrow golden beams."],
    "tea": ["Tea steeps in silence.", "Steam curls from the teapot.", "Green tea tastes of cut grass.",
            "A second cup warms cold hands.", "Honey sinks slowly through the dark tea."],
    "a bicycle": ["Chains click uphill.", "Flat tires end summer rides.", "A bicycle bell clears the path.",
                  "Wind rushes past on the downhill.", "Spokes flash in the low afternoon sun."],
    "the desert": ["Dunes shift overnight.", "Stars crowd the desert sky.", "Heat shimmers above cracked sand.",
                   "Lizards sprint between hot rocks.", "Cactus flowers open after the rare rain."],
}
TOPICS = tuple(ANCHORS)
FILLERS = ("really", "very", "basically", "just", "actually", "truly")
FORMULAS = ("{T} is a very nice thing.", "This is a sentence about {t}.", "I like {t} very much.",
            "{T} is good and {t} is nice.", "Here is something about {t}.")
SCORES = {"good": 9, "filler": 5, "verbose": 4, "formulaic": 3, "repeat": 2, "truncated": 2, "offtopic": 1}
KINDS = tuple(SCORES)


def words(text: str) -> list[str]:
    """The words of an answer: whitespace-separated pieces that hold a letter or a digit."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def formulaic(topic: str, rng: random.Random) -> str:
    t = topic
    return rng.choice(FORMULAS).format(t=t, T=t[0].upper() + t[1:])


def degrade(topic: str, kind: str, rng: random.Random) -> str:
    """An answer about ``topic`` with one flaw of ``kind`` (KINDS; "good" is another anchor, unflawed)."""
    if kind not in SCORES:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    base = rng.choice(ANCHORS[topic])
    w = base.rstrip(".!").split()
    if kind == "good":
        return base
    if kind == "filler":
        for _ in range(rng.randint(1, 2)):
            w.insert(rng.randint(1, len(w)), rng.choice(FILLERS))
    elif kind == "verbose":
        w += f"and that is really all there is to say about {topic}".split()
    elif kind == "formulaic":
        return formulaic(topic, rng)
    elif kind == "repeat":
        i = rng.randrange(len(w))
        w[i:i + 1] = [w[i]] * rng.randint(3, 4)
    elif kind == "truncated":
        w = w[:max(1, len(w) // 2)]
        return " ".join(w)
    elif kind == "offtopic":
        return rng.choice(ANCHORS[rng.choice([t for t in TOPICS if t != topic])])
    return " ".join(w) + "."
