"""Generate the lorakit quickstart dataset: a support assistant for a FICTIONAL product.

The product, the "Nimbus Kettle K3" by "Brightfold Labs", does not exist, so a base
instruct model (e.g. SmolLM2-135M-Instruct) cannot know any of the facts below; a LoRA
adapter trained on this data can. Each fact has one canonical answer (always phrased
identically, which helps a small model memorise it) and several paraphrased questions.

Outputs (written next to this script):
  support_train.jsonl             ~440 chat examples (single-turn and 2-user-turn)
  support_eval.jsonl              40 single-turn examples, one per fact, whose question
                                  wording never appears in train
  support_heldout_questions.json  5 {"question", "answer"} pairs (also unseen wording)
                                  for the base-vs-adapted demo

Every line of the .jsonl files is {"messages": [{"role": ..., "content": ...}, ...]}
with the same system message first.

Regenerate (deterministic, stdlib only, seeded with random.Random(0)):
  python3 examples/data/make_support_data.py
"""

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
SYSTEM = "You are the support assistant for the Nimbus Kettle K3 by Brightfold Labs."

# (key, canonical answer, paraphrased questions separated by " | ").
# The LAST question of every fact is held out for eval; for the facts in HELDOUT_KEYS
# the second-to-last question is held out for the demo. The rest are used in train.
FACTS = [
    ("capacity", "The Nimbus Kettle K3 has a maximum capacity of 1.7 litres.",
     "How much water does the K3 hold? | What is the maximum capacity of the kettle? | "
     "How many litres fit in the Nimbus Kettle K3? | What's the max fill of the K3? | "
     "How big is the kettle's water tank?"),
    ("min_fill", "The minimum fill level is 0.3 litres.",
     "What is the minimum amount of water I can boil? | What's the minimum fill level? | "
     "How little water can I put in the K3? | Is there a minimum water level? | "
     "What's the smallest amount of water the kettle will heat?"),
    ("price", "The Nimbus Kettle K3 costs $89.",
     "How much does the Nimbus Kettle K3 cost? | What is the price of the K3? | "
     "How much is the kettle? | What does the K3 sell for? | What's the retail price of the Nimbus Kettle?"),
    ("colours", "The K3 comes in three colours: Slate Grey, Fjord Blue and Ember Red.",
     "What colours does the K3 come in? | Which colors is the kettle available in? | "
     "Can I get the Nimbus Kettle K3 in different colours? | What color options are there? | "
     "What finishes can I choose for the K3?"),
    ("app", "The companion app is called Brightfold Home.",
     "What is the name of the companion app? | Which app do I use with the K3? | "
     "What app controls the kettle? | Is there a phone app for the Nimbus Kettle? | "
     "Which app should I download for my kettle? | What smartphone app goes with the K3?"),
    ("wifi_pin", "The default Wi-Fi setup PIN is 4729.",
     "What is the default Wi-Fi setup PIN? | What PIN do I enter when connecting the kettle to Wi-Fi? | "
     "The app is asking for a setup PIN, what is it? | What's the K3's default pairing PIN? | "
     "Which PIN does the kettle use for Wi-Fi setup? | What code do I type in during Wi-Fi setup?"),
    ("wifi_band", "The K3 connects to 2.4 GHz Wi-Fi networks only.",
     "Does the K3 support 5 GHz Wi-Fi? | Which Wi-Fi band does the kettle use? | "
     "Can the kettle join a 5 GHz network? | What Wi-Fi frequency does the K3 need? | "
     "Will my kettle work on 5GHz Wi-Fi?"),
    ("pairing", "Press and hold the Wi-Fi button for 5 seconds until the light pulses blue.",
     "How do I put the kettle into pairing mode? | How do I start Wi-Fi pairing on the K3? | "
     "How do I connect the K3 to the app? | What button starts pairing mode? | "
     "How can I get the kettle ready to pair with my phone?"),
    ("firmware", "The latest firmware version is 3.8.2.",
     "What is the latest firmware version? | Which firmware version is current for the K3? | "
     "What's the newest K3 firmware? | What firmware should my kettle be on? | "
     "Which firmware release is the most recent?"),
    ("fw_update", "Firmware updates install automatically overnight through the Brightfold Home app.",
     "How do I update the firmware? | How does the K3 get firmware updates? | "
     "Do I need to update the kettle software manually? | When do firmware updates install? | "
     "How are software updates delivered to the kettle?"),
    ("warranty", "The Nimbus Kettle K3 has a 3-year limited warranty.",
     "How long is the warranty? | What warranty comes with the K3? | "
     "How many years of warranty does the kettle have? | Is the Nimbus Kettle K3 under warranty? | "
     "For how long is my kettle covered by the warranty? | What is the warranty period on the K3?"),
    ("descale_interval", "Descale the kettle every 6 weeks.",
     "How often should I descale the kettle? | What is the descale interval? | "
     "How frequently does the K3 need descaling? | When should I descale my K3? | "
     "How many weeks between descaling? | How often do I need to remove limescale from the K3?"),
    ("descale_how", "Fill to the 1.0-litre mark with a 1:1 mix of white vinegar and water, "
     "run the Descale program, then rinse twice.",
     "How do I descale the K3? | What is the descaling procedure? | "
     "How do I run a descale? | What should I use to descale the kettle? | "
     "What are the steps to clean limescale out of the kettle?"),
    ("amber_light", "A blinking amber light means the kettle needs descaling.",
     "What does the blinking amber light mean? | Why is the light flashing amber? | "
     "My K3 has a blinking orange light, what does it mean? | What does a flashing amber light indicate? | "
     "The amber light keeps blinking, what's wrong? | Why is there an amber light blinking on my kettle?"),
    ("red_light", "A solid red light means the kettle is empty and dry-boil protection has switched it off.",
     "What does the solid red light mean? | Why is there a steady red light? | "
     "My kettle shows a red light and won't heat, why? | What does a constant red light indicate? | "
     "Why did the kettle turn off with a red light on?"),
    ("blue_light", "A pulsing blue light means the kettle is in Wi-Fi pairing mode.",
     "What does the pulsing blue light mean? | Why is the light pulsing blue? | "
     "What does a slowly flashing blue light indicate? | The K3 light is pulsing blue, what is it doing? | "
     "Why does my kettle glow blue on and off?"),
    ("green_light", "A solid green light means the water is at your chosen temperature and is being kept warm.",
     "What does the solid green light mean? | Why is the light green? | "
     "What does a steady green light indicate? | My K3 shows a green light, what does it mean? | "
     "What is the green light on the kettle telling me?"),
    ("reset", "Hold the Power and Keep-Warm buttons together for 10 seconds to factory reset.",
     "How do I factory reset the K3? | How do I reset the kettle? | "
     "What is the reset button combination? | How can I restore factory settings? | "
     "Which buttons do I press to reset the kettle? | How do I wipe the K3 back to factory defaults?"),
    ("email", "Email support at k3-support@brightfold-labs.example.",
     "What is the support email? | How do I email customer support? | "
     "What email address can I contact for help? | Where do I send a support email? | "
     "What's Brightfold's support email address?"),
    ("phone", "Call Brightfold support at 1-800-555-0173, Monday to Friday, 8am to 6pm.",
     "What is the support phone number? | How do I call customer support? | "
     "Is there a number I can ring for help? | What are the phone support hours? | "
     "What number do I dial to reach Brightfold support?"),
    ("presets", "The K3 has five temperature presets: 70, 80, 85, 90 and 100 degrees C.",
     "What temperature presets are there? | Which temperatures can I choose? | "
     "Can I set the water temperature? | How many temperature settings does the K3 have? | "
     "What heat presets does the kettle offer?"),
    ("keep_warm", "Keep-Warm holds the water at temperature for up to 45 minutes.",
     "How long does Keep-Warm last? | How long will the kettle keep water hot? | "
     "What is the keep warm duration? | How long does the K3 hold the temperature? | "
     "For how many minutes does the keep-warm function run?"),
    ("boil_time", "A full 1.7-litre kettle boils in about 4 minutes.",
     "How long does it take to boil? | How fast does the K3 boil water? | "
     "What is the boil time for a full kettle? | How many minutes to boil a full K3? | "
     "How quickly does the kettle bring water to a boil?"),
    ("power", "The K3 is rated at 2200 watts.",
     "How many watts is the K3? | What is the power rating of the kettle? | "
     "What wattage does the kettle use? | How powerful is the K3 heating element? | "
     "What's the kettle's power consumption in watts?"),
    ("cord", "The power cord is 75 cm long.",
     "How long is the power cord? | What is the cable length? | "
     "How long is the K3's cord? | Is the power cable long? | How many centimetres is the kettle cord?"),
    ("filter", "The K3 has a removable micro-mesh limescale filter; rinse it weekly.",
     "Does the kettle have a filter? | How often should I clean the filter? | "
     "Is there a limescale filter in the K3? | Can I remove the filter? | "
     "What do I do with the mesh filter in the spout?"),
    ("dishwasher", "No, the kettle body is not dishwasher safe, but the limescale filter is.",
     "Is the K3 dishwasher safe? | Can I put the kettle in the dishwasher? | "
     "Can the kettle go in a dishwasher? | Is it OK to wash the K3 in the dishwasher? | "
     "Will the dishwasher damage my kettle?"),
    ("material", "The inner chamber is made of 304 stainless steel, with no plastic touching the water.",
     "What is the inside of the kettle made of? | Does any plastic touch the water? | "
     "What material is the K3 chamber? | Is the kettle stainless steel inside? | "
     "What grade of steel is used in the kettle?"),
    ("voice", "The K3 works with Alexa and Google Assistant through the Brightfold Home app.",
     "Does the K3 work with Alexa? | Can I control the kettle with Google Assistant? | "
     "Which voice assistants does the K3 support? | Can I use voice commands with the kettle? | "
     "Is the kettle compatible with smart speakers?"),
    ("child_lock", "To turn on Child Lock, hold the Keep-Warm button for 3 seconds.",
     "How do I turn on the child lock? | Does the K3 have a child lock? | "
     "How do I lock the kettle buttons? | How can I stop kids from using the kettle? | "
     "How do I enable the K3's safety lock?"),
    ("e2", "Error code E2 means the kettle was lifted off the base while heating; put it back and press Power.",
     "What does error E2 mean? | My kettle shows E2, what do I do? | "
     "What is error code E2? | Why does the display say E2? | How do I fix an E2 error?"),
    ("e4", "Error code E4 means the base temperature sensor has failed; contact support for a replacement base.",
     "What does error E4 mean? | My K3 shows E4, what should I do? | "
     "What is error code E4? | Why does the display say E4? | How do I fix an E4 error?"),
    ("weight", "The K3 weighs 1.2 kg when empty.",
     "How much does the K3 weigh? | What is the weight of the kettle? | "
     "How heavy is the Nimbus Kettle K3? | What does the kettle weigh empty? | "
     "How many kilograms is the K3?"),
    ("release", "The Nimbus Kettle K3 was released in March 2024.",
     "When was the K3 released? | When did the Nimbus Kettle K3 come out? | "
     "What is the release date of the K3? | When was the kettle launched? | "
     "In which month and year did the K3 go on sale?"),
    ("predecessor", "The K3 replaced the Nimbus Kettle K2.",
     "What model did the K3 replace? | What was the previous Nimbus kettle? | "
     "Which kettle came before the K3? | What is the K3's predecessor? | "
     "Was there an older version of the Nimbus Kettle?"),
    ("hq", "Brightfold Labs is based in Tromso, Norway.",
     "Where is Brightfold Labs based? | Where is the company located? | "
     "Which country is Brightfold Labs from? | Where is Brightfold headquartered? | "
     "In which city is the maker of the K3?"),
    ("base_part", "The replacement base is part number BFL-K3-BASE-07.",
     "What is the part number for a replacement base? | How do I order a new base? | "
     "Which base part fits the K3? | What's the base's part number? | "
     "What spare part number should I order if my kettle base breaks?"),
    ("returns", "You can return the kettle within 60 days of purchase for a full refund.",
     "What is the return policy? | Can I return the K3? | "
     "How many days do I have to return the kettle? | Can I get a refund on the kettle? | "
     "How long is the return window for the K3?"),
    ("quiet", "Quiet Boil mode lowers the boil noise to about 42 dB; turn it on in the Brightfold Home app.",
     "Is there a quiet mode? | How do I make the kettle quieter? | "
     "How loud is Quiet Boil mode? | Can the K3 boil more quietly? | "
     "Is there a way to reduce the kettle's noise?"),
    ("schedule", "You can schedule a boil up to 7 days ahead in the Brightfold Home app.",
     "Can I schedule the kettle to boil? | How far ahead can I schedule a boil? | "
     "Can I set a timer for the K3? | Can the kettle boil at a set time in the morning? | "
     "How many days in advance can I plan a boil?"),
]
HELDOUT_KEYS = ["wifi_pin", "app", "warranty", "descale_interval", "amber_light"]
PREFIXES = ["Hi! ", "Hello, ", "Quick question: ", "Hey there. ", "Hi, I have a K3. ", "Good morning. "]
FOLLOW_UPS = ["Thanks. ", "Great, thanks! ", "OK. ", "Got it. ", "One more thing: "]


def split_facts():
    """Return {key: (answer, train_questions, eval_question, heldout_question_or_None)}."""
    out = {}
    for key, answer, questions in FACTS:
        qs = [q.strip() for q in questions.split(" | ")]
        if key in HELDOUT_KEYS:
            assert len(qs) >= 6, key
            out[key] = (answer, qs[:-2], qs[-1], qs[-2])
        else:
            assert len(qs) >= 5, key
            out[key] = (answer, qs[:-1], qs[-1], None)
    return out


def conv(*turns):
    """turns: (user, assistant) pairs -> {"messages": [...]} with the system message."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for user, assistant in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs}


def build(rng, facts):
    keys = list(facts)
    train = []
    for key in keys:
        answer, train_qs, _, _ = facts[key]
        for q in train_qs:
            train.append(conv((q, answer)))                         # plain wording
            train.append(conv((rng.choice(PREFIXES) + q, answer)))  # with a greeting
    for _ in range(120):  # multi-turn: two different facts in one conversation
        k1, k2 = rng.sample(keys, 2)
        q1, q2 = rng.choice(facts[k1][1]), rng.choice(facts[k2][1])
        train.append(conv((q1, facts[k1][0]), (rng.choice(FOLLOW_UPS) + q2, facts[k2][0])))
    rng.shuffle(train)
    evals = [conv((facts[k][2], facts[k][0])) for k in keys]
    heldout = [{"question": facts[k][3], "answer": facts[k][0]} for k in HELDOUT_KEYS]
    return train, evals, heldout


def check(train, evals, heldout):
    """No eval/held-out question may appear (even as a substring) in any train user turn."""
    train_users = [m["content"].lower() for ex in train for m in ex["messages"] if m["role"] == "user"]
    probes = [ex["messages"][1]["content"] for ex in evals] + [h["question"] for h in heldout]
    assert len(set(p.lower() for p in probes)) == len(probes), "duplicate held-out questions"
    for p in probes:
        leaks = [u for u in train_users if p.lower() in u]
        assert not leaks, f"held-out question leaked into train: {p!r}"
    all_qs = [q.strip().lower() for _, _, qs in FACTS for q in qs.split(" | ")]
    assert len(set(all_qs)) == len(all_qs), "duplicate paraphrase across facts"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(0)
    facts = split_facts()
    train, evals, heldout = build(rng, facts)
    check(train, evals, heldout)
    write_jsonl(OUT_DIR / "support_train.jsonl", train)
    write_jsonl(OUT_DIR / "support_eval.jsonl", evals)
    with open(OUT_DIR / "support_heldout_questions.json", "w", encoding="utf-8") as f:
        json.dump(heldout, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"{len(FACTS)} facts -> {len(train)} train, {len(evals)} eval, "
          f"{len(heldout)} held-out questions in {OUT_DIR}")


if __name__ == "__main__":
    main()
