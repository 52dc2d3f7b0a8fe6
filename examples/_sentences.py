"""Deterministic, offline English sentences for the MiniLM example.

Two disjoint sets built from different sources: `evaluation_sentences` (60 hand-written
sentences on varied topics, their paraphrases, and sentences from statement templates)
and `calibration_sentences` (question / instruction / report templates). No downloads.
"""

from __future__ import annotations

import numpy as np

HAND_WRITTEN = (
    "A man is playing a guitar on the street.",
    "The stock market fell sharply after the announcement.",
    "She baked a chocolate cake for her brother's birthday.",
    "Quantum computers use qubits instead of classical bits.",
    "The committee postponed the vote until next Tuesday.",
    "Heavy rain flooded several roads in the northern district.",
    "My laptop battery drains faster than it used to.",
    "The museum opened a new exhibition of Roman coins.",
    "He forgot his umbrella and got soaked on the way home.",
    "Photosynthesis converts sunlight into chemical energy.",
    "The referee showed a red card in the final minute.",
    "Can you recommend a good book about medieval history?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed by three hours because of fog.",
    "Researchers found a new species of frog in the rainforest.",
    "The city council approved funding for a new bike lane.",
    "Please turn off the lights when you leave the room.",
    "The violinist performed Bach's partita without sheet music.",
    "Electric cars are becoming cheaper every year.",
    "The toddler refused to eat his vegetables.",
    "A strong earthquake shook the coastal town last night.",
    "The software update fixed a bug in the login page.",
    "They hiked to the summit before sunrise.",
    "The bank raised interest rates by a quarter point.",
    "Cats often sleep for more than twelve hours a day.",
    "The novel follows a detective in 1920s Shanghai.",
    "I need to renew my passport before the trip.",
    "The bakery on the corner sells fresh croissants every morning.",
    "Volcanic ash forced airlines to cancel hundreds of flights.",
    "The students built a robot that can sort recycling.",
    "Drinking enough water helps you stay focused.",
    "The orchestra tuned their instruments before the concert.",
    "A thief stole a painting from the gallery overnight.",
    "The new vaccine showed strong results in clinical trials.",
    "He repaired the bicycle's flat tire in ten minutes.",
    "The mountain village has no mobile phone coverage.",
    "Our team won the regional chess championship.",
    "The price of coffee beans doubled this year.",
    "She is learning Japanese with an app on her phone.",
    "The bridge will be closed for repairs all weekend.",
    "Wolves were reintroduced to the national park in 1995.",
    "The printer is out of ink again.",
    "A large telescope captured images of a distant galaxy.",
    "The children built a sandcastle at the beach.",
    "The company announced layoffs in its marketing division.",
    "Honey never spoils if it is stored properly.",
    "The detective questioned the butler about the missing key.",
    "I prefer tea to coffee in the afternoon.",
    "The satellite will monitor sea ice in the Arctic.",
    "A dog chased the ball across the park.",
    "The chef seasoned the soup with fresh thyme.",
    "Traffic was unusually light on the highway this morning.",
    "The hospital hired twenty new nurses.",
    "Ancient Egyptians built pyramids as tombs for pharaohs.",
    "The password must contain at least eight characters.",
    "He apologized for being late to the meeting.",
    "Solar panels were installed on the school roof.",
    "The river froze completely during the cold winter.",
    "Café owners in Zürich complained about the new tax.",
    "The startup raised $20 million in its first funding round.",
)

# Paraphrase pairs (close in meaning) for the sanity check of the encoder.
PARAPHRASES = (
    ("A man is playing a guitar on the street.", "Someone plays guitar outside on the road."),
    ("The stock market fell sharply after the announcement.",
     "Share prices dropped steeply following the news."),
    ("Heavy rain flooded several roads in the northern district.",
     "Roads in the north were flooded by a downpour."),
    ("Our flight was delayed by three hours because of fog.",
     "Fog held up our plane for three hours."),
    ("Cats often sleep for more than twelve hours a day.",
     "Cats frequently nap over half of the day."),
    ("The bank raised interest rates by a quarter point.",
     "Interest rates were increased by 0.25 percent by the central bank."),
    ("A dog chased the ball across the park.", "The dog ran after a ball in the park."),
    ("I need to renew my passport before the trip.",
     "Before traveling I have to get my passport renewed."),
    ("The chef seasoned the soup with fresh thyme.", "The cook added fresh thyme to the soup."),
    ("The printer is out of ink again.", "The printer has run out of ink once more."),
)

_SUBJECTS = ("the old farmer", "a young engineer", "my neighbour", "the teacher", "our manager",
             "a tired nurse", "the pilot", "the little girl", "a famous author",
             "the police officer", "two students", "the mayor", "a street musician",
             "the scientist", "my grandmother", "the football coach", "a stray cat",
             "the new intern", "the taxi driver", "a group of tourists")
_VERBS = (("repaired", "repair"), ("painted", "paint"), ("sold", "sell"),
          ("found", "find"), ("ignored", "ignore"), ("described", "describe"),
          ("carried", "carry"), ("photographed", "photograph"), ("borrowed", "borrow"),
          ("cleaned", "clean"), ("ordered", "order"), ("lost", "lose"),
          ("studied", "study"), ("designed", "design"), ("delivered", "deliver"))
_OBJECTS = ("an old wooden boat", "the broken window", "a basket of apples", "the annual report",
            "a bright red kite", "the kitchen sink", "a map of the city", "the concert tickets",
            "a box of letters", "the garden fence", "a new smartphone", "the school bus",
            "a jar of honey", "the ancient manuscript", "a pair of running shoes",
            "the solar panel", "a cup of hot chocolate", "the wedding cake")
_PLACES = ("in the village square", "near the harbour", "at the train station",
           "behind the library", "on the top floor", "in a small café", "at the airport",
           "in the mountains", "by the river", "in the hospital", "at the market",
           "in the laboratory", "on the beach", "in the parking lot")
_TIMES = ("yesterday", "last winter", "early this morning", "after lunch", "on Sunday",
          "during the storm", "at midnight", "two weeks ago", "before the holidays",
          "in 2019")
_ADJ = ("surprisingly", "quickly", "carefully", "reluctantly", "quietly", "proudly",
        "nervously", "happily")

_EVAL_TEMPLATES = (
    "{S} {V} {O} {P} {T}.",
    "{T}, {S} {A} {V} {O}.",
    "{S} {V} {O} {P}, and nobody noticed.",
    "According to the news, {S} {V} {O} {T}.",
)
_CALIB_TEMPLATES = (
    "Why did {S} {B} {O} {P}?",
    "Please {B} {O} before {S} arrives.",
    "Is it true that {S} wants to {B} {O} {T}?",
    "Report: {S} will {B} {O} {P} next week.",
    "How long does it take to {B} {O}?",
)


def _fill(template: str, rng: np.random.Generator) -> str:
  v = _VERBS[rng.integers(len(_VERBS))]
  s = template.format(S=_SUBJECTS[rng.integers(len(_SUBJECTS))], V=v[0], B=v[1],
                      O=_OBJECTS[rng.integers(len(_OBJECTS))],
                      P=_PLACES[rng.integers(len(_PLACES))],
                      T=_TIMES[rng.integers(len(_TIMES))], A=_ADJ[rng.integers(len(_ADJ))])
  return s[0].upper() + s[1:]


def _generate(templates, n: int, seed: int, exclude=()) -> list[str]:
  rng = np.random.default_rng(seed)
  out, seen = [], set(exclude)
  while len(out) < n:
    s = _fill(templates[len(out) % len(templates)], rng)
    if s not in seen:
      seen.add(s)
      out.append(s)
  return out


def evaluation_sentences(n: int = 300) -> list[str]:
  """``n`` sentences: hand-written ones, paraphrases, then statement templates."""
  base = list(dict.fromkeys(HAND_WRITTEN + tuple(p[1] for p in PARAPHRASES)))
  if n <= len(base):
    return base[:n]
  return base + _generate(_EVAL_TEMPLATES, n - len(base), seed=0, exclude=base)


def calibration_sentences(n: int = 256) -> list[str]:
  """``n`` sentences from question/instruction templates, disjoint from the evaluation set."""
  return _generate(_CALIB_TEMPLATES, n, seed=1)
