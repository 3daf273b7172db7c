"""Word lists and templates the benchmark generators draw from (our own, shipped as Python data).

The OOLONG-style instances are short questions, each written so that its class among the six
coarse TREC question types can be told from its text alone: what is asked for (a person, a
place, a number, an expansion of an abbreviation, a thing, or an explanation) is plain in
the wording. Templates hold `{slot}` names filled from the lists of the same name.
"""

from __future__ import annotations

__all__ = ["LABELS", "LABEL_WEIGHTS", "TEMPLATES", "SLOTS", "NOISE_SENTENCES", "SALAD_WORDS", "NEEDLE_WORDS"]

# The six coarse classes, in the order the questions list them.
LABELS = (
    "abbreviation",
    "entity",
    "description and abstract concept",
    "human being",
    "location",
    "numeric value",
)

# How often each class occurs; unequal on purpose (as in the TREC questions) so that
# "most common" questions have clear answers.
LABEL_WEIGHTS = (0.06, 0.22, 0.20, 0.20, 0.16, 0.16)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "abbreviation": (
        "What does {acronym} stand for?",
        "What is the full form of the abbreviation {acronym}?",
        "{acronym} is short for what?",
        "What is the abbreviation for {longform}?",
        "What do the letters {acronym} mean when written as an abbreviation?",
    ),
    "entity": (
        "Which breed of dog is best known for {dog_trait}?",
        "What color is the flag of {country}?",
        "What musical instrument did {musician} play?",
        "What is the favorite food of {animal_plural}?",
        "What sport is played at {venue}?",
        "What was the name of the ship that {ship_event}?",
        "Which fruit is used to make {fruit_product}?",
        "What kind of tree produces {tree_product}?",
        "What is the name of the board game in which players {game_action}?",
    ),
    "description and abstract concept": (
        "What is {concept}?",
        "Why do {animal_plural} {animal_habit}?",
        "How does a {device} work?",
        "What does it mean to {idiom}?",
        "What is the difference between {concept} and {concept2}?",
        "Why is {phenomenon}?",
        "How can I learn to {skill}?",
    ),
    "human being": (
        "Who invented the {invention}?",
        "Who was the first person to {feat}?",
        "Who wrote the novel {novel}?",
        "Who painted {painting}?",
        "Who was the leader of {group} in {year}?",
        "Which scientist discovered {discovery}?",
        "Who is the author of the play {play}?",
    ),
    "location": (
        "Where is {landmark} located?",
        "What country is the city of {city} in?",
        "In which city was {musician} born?",
        "Where do wild {animal_plural} live?",
        "What is the capital of {country}?",
        "Which river flows through {city}?",
        "On which continent is {country}?",
    ),
    "numeric value": (
        "How many {small_unit} are in a {big_unit}?",
        "In what year was the {invention} invented?",
        "How tall is {landmark}?",
        "How far is {city} from {city2} in kilometres?",
        "How much does an adult {animal} weigh?",
        "How many people live in {city}?",
        "At what temperature does {substance} boil?",
    ),
}

SLOTS: dict[str, tuple[str, ...]] = {
    "acronym": ("NASA", "UNESCO", "NATO", "DNA", "RSVP", "GDP", "LASER", "SCUBA", "HTML", "WHO", "UFO",
                "ATM", "CPU", "FBI", "PIN", "ASAP", "DIY", "IMF", "OPEC", "RADAR"),
    "longform": ("the United Nations", "the European Union", "personal identification number",
                 "frequently asked questions", "the World Trade Organization", "compact disc",
                 "the International Space Station", "very important person", "as soon as possible",
                 "estimated time of arrival"),
    "dog_trait": ("herding sheep", "pulling sleds", "tracking scents", "guarding homes", "retrieving ducks",
                  "rescuing people in the mountains", "hunting badgers", "racing"),
    "country": ("Japan", "Brazil", "Canada", "Kenya", "Norway", "Peru", "Italy", "Egypt", "Chile",
                "Vietnam", "Ireland", "Mexico", "Finland", "Ghana", "Portugal", "Nepal"),
    "musician": ("Louis Armstrong", "Jimi Hendrix", "Ray Charles", "Yo-Yo Ma", "Frederic Chopin",
                 "Miles Davis", "Ravi Shankar", "Charlie Parker", "Django Reinhardt", "Clara Schumann"),
    "animal": ("elephant", "giraffe", "polar bear", "gorilla", "hippopotamus", "rhinoceros", "moose",
               "bison", "camel", "walrus", "tiger", "horse"),
    "animal_plural": ("pandas", "koalas", "otters", "penguins", "flamingos", "beavers", "hedgehogs",
                      "sloths", "raccoons", "lemurs", "armadillos", "puffins"),
    "animal_habit": ("sleep so much", "migrate in winter", "live in groups", "change color", "build nests",
                     "hibernate", "stand on one leg", "hunt at night"),
    "venue": ("Wimbledon", "Lord's", "Augusta National", "Fenway Park", "Twickenham", "the Maracana",
              "Madison Square Garden", "Le Mans"),
    "ship_event": ("sank in 1912 after hitting an iceberg", "carried the Pilgrims to America in 1620",
                   "Charles Darwin sailed on", "Captain Cook commanded on his first voyage",
                   "was the first to sail around the world", "Blackbeard captained"),
    "fruit_product": ("marmalade", "cider", "guacamole", "raisins", "wine", "tapenade", "pesto",
                      "orange juice"),
    "tree_product": ("acorns", "maple syrup", "cork", "walnuts", "rubber", "cinnamon", "dates", "olives"),
    "game_action": ("buy streets and build hotels", "capture the opponent's king", "form words from letter tiles",
                    "race pieces home by rolling dice", "solve a murder in a mansion",
                    "claim railway routes across a map"),
    "concept": ("photosynthesis", "inflation", "democracy", "gravity", "entropy", "irony", "a metaphor",
                "natural selection", "compound interest", "a black hole", "osmosis", "a haiku",
                "nostalgia", "the placebo effect", "plate tectonics", "a sonnet"),
    "concept2": ("weather", "a simile", "a republic", "a virus", "a bacterium", "a comet", "mass",
                 "an allegory", "a loan", "diffusion"),
    "device": ("refrigerator", "microwave oven", "compass", "thermostat", "jet engine", "solar panel",
               "barometer", "smoke detector", "touch screen", "hydraulic press"),
    "idiom": ("bite the bullet", "break the ice", "spill the beans", "burn the midnight oil",
              "cut corners", "hit the sack", "steal someone's thunder", "let the cat out of the bag"),
    "phenomenon": ("the sky blue", "the sea salty", "ice slippery", "the moon visible during the day",
                   "a rainbow curved", "thunder louder than rain", "bread stale after a few days",
                   "the grass wet in the morning"),
    "skill": ("juggle", "knit a scarf", "play chess well", "speak in public", "meditate", "ride a unicycle",
              "bake sourdough bread", "read music"),
    "invention": ("telephone", "light bulb", "printing press", "steam engine", "bicycle", "telescope",
                  "typewriter", "radio", "sewing machine", "lawn mower", "zipper", "microscope"),
    "feat": ("climb Mount Everest", "walk on the moon", "fly across the Atlantic alone",
             "reach the South Pole", "swim the English Channel", "orbit the Earth",
             "run a mile in under four minutes", "sail solo around the world"),
    "novel": ("Moby-Dick", "Pride and Prejudice", "War and Peace", "Don Quixote", "Frankenstein",
              "Middlemarch", "The Trial", "Great Expectations", "Anna Karenina", "Dracula"),
    "painting": ("the Mona Lisa", "The Starry Night", "The Night Watch", "The Scream", "Guernica",
                 "Girl with a Pearl Earring", "The Birth of Venus", "The Persistence of Memory"),
    "group": ("the Roman Republic", "the Mongol Empire", "the Beatles", "the Apollo program",
              "the Manhattan Project", "the Hanseatic League"),
    "year": ("1066", "1215", "1492", "1588", "1776", "1815", "1865", "1914", "1945", "1969"),
    "discovery": ("penicillin", "radium", "the electron", "oxygen", "insulin", "the structure of DNA",
                  "X-rays", "the neutron"),
    "play": ("Hamlet", "Waiting for Godot", "A Doll's House", "The Cherry Orchard", "Death of a Salesman",
             "The Importance of Being Earnest", "Cyrano de Bergerac", "Our Town"),
    "landmark": ("the Eiffel Tower", "Machu Picchu", "the Taj Mahal", "the Statue of Liberty",
                 "Angkor Wat", "the Great Sphinx", "Mount Kilimanjaro", "the Leaning Tower of Pisa",
                 "Big Ben", "the Golden Gate Bridge", "Stonehenge", "the CN Tower"),
    "city": ("Kyoto", "Marrakesh", "Cusco", "Bergen", "Valparaiso", "Hanoi", "Porto", "Kathmandu",
             "Accra", "Turku", "Oaxaca", "Galway", "Florence", "Alexandria", "Quebec City", "Salzburg"),
    "city2": ("Paris", "Lagos", "Lima", "Oslo", "Santiago", "Bangkok", "Madrid", "Delhi", "Nairobi",
              "Helsinki", "Dublin", "Rome", "Cairo", "Toronto", "Vienna", "Boston"),
    "small_unit": ("ounces", "inches", "minutes", "centimetres", "teaspoons", "days", "pints", "grams"),
    "big_unit": ("pound", "foot", "day", "metre", "cup", "leap year", "gallon", "kilogram"),
    "substance": ("water", "ethanol", "mercury", "olive oil", "liquid nitrogen", "sea water", "milk",
                  "acetone"),
}

# Filler for the S-NIAH haystack, in the spirit of RULER's repeated noise.
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Words for the "word salad" haystack variant and for needle keys.
SALAD_WORDS = (
    "amber", "basin", "cobalt", "drift", "ember", "fable", "gravel", "harbor", "ivory", "jasper", "kettle",
    "lantern", "meadow", "nectar", "orchard", "pebble", "quartz", "ripple", "saffron", "thistle", "umber",
    "velvet", "willow", "yonder", "zephyr", "anchor", "bramble", "cinder", "dune", "echo", "fern", "glacier",
    "hollow", "island", "juniper", "kelp", "lagoon", "marble", "nimbus", "opal", "prairie", "quill", "reef",
    "summit", "tundra", "upland", "valley", "wander", "yarrow", "zenith",
)

NEEDLE_WORDS = (
    "curious", "silent", "golden", "hidden", "brave", "restless", "gentle", "crimson", "hollow", "swift",
    "ancient", "lucky", "patient", "quiet", "wild", "frozen", "bright", "distant", "humble", "sturdy",
)
