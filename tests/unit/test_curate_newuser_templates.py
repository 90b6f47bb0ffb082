"""Near-dedup on instruction-templated data: one long instruction shared by every record is not a likeness."""

from __future__ import annotations

from sftlab.data.conversation import Conversation
from sftlab.data.curate import CurateOptions, curate

INSTRUCTION = ("You are given a customer review from an online electronics store. Read the review carefully and "
               "decide whether the overall opinion of the customer about the product is positive or negative. "
               "Answer with exactly one word.")
REVIEWS = {
    "positive": ["The battery lasts all day and charges in under an hour.", "Bright sharp screen, easy to read outdoors.",
                 "Setup took two minutes and it has worked flawlessly since.", "Solid metal body, feels worth the price.",
                 "Sound is rich and the bass surprised my whole family.", "The camera takes crisp photos even at night.",
                 "Fast shipping and the charger works with my old laptop.", "Quiet fan, cool laptop, happy student.",
                 "Keys are responsive and the backlight is gentle.", "Great mouse for long gaming sessions, no cramps.",
                 "My daughter loves the tablet for drawing.", "The cable is thick, long and charges quickly."],
    "negative": ["Died after two weeks of light use.", "Arrived cracked and the seller never answered my emails.",
                 "Stopped working right after the firmware update.", "Flimsy plastic and far too expensive for what it is.",
                 "The speaker crackles at any volume above half.", "Blurry pictures unless you stand perfectly still.",
                 "Charger overheats and smells of burnt plastic.", "Loud fan that whines all evening.",
                 "Two keys stuck within a month.", "The scroll wheel squeaks and skips constantly.",
                 "Screen flickers whenever the brightness is low.", "Cable frayed at the plug after one week."],
}


def reviews() -> list[Conversation]:
    return [Conversation(messages=[{"role": "user", "content": f"{INSTRUCTION}\n\nReview: {text}"},
                                   {"role": "assistant", "content": label}], source=f"{label}{i}")
            for label, texts in REVIEWS.items() for i, text in enumerate(texts)]


def test_records_sharing_a_long_instruction_are_not_near_duplicates():
    """24 different reviews under one 36-word instruction: judged with the instruction, 5 of them were
    near-duplicates of others (and 72 of 80 slot-filled reviews in a larger set)."""
    convs = reviews()
    kept, report = curate(convs, CurateOptions())
    assert len(kept) == len(convs), report.removals[:3]


def test_a_near_copy_is_still_found_among_templated_records():
    convs = reviews()
    copy = Conversation(messages=[{"role": "user", "content": f"{INSTRUCTION}\n\nReview: The battery lasts all day "
                                   "and it charges in under an hour!"}, {"role": "assistant", "content": "positive"}],
                        source="copy")
    kept, report = curate([*convs, copy], CurateOptions())
    assert [r["source"] for r in report.removals] == ["copy"]
    assert report.removals[0]["duplicate_of"] == "positive0" and len(kept) == len(convs)
