"""Writes records.jsonl: 60 OpenAI-format chat records for the tools in tools.yaml (a weather, unit-conversion and
calendar assistant). Deterministic: rerunning gives the same file.

    python tests/data/tool_call_task/make_records.py

40 single calls (arguments as JSON text, as OpenAI's API returns them, or as objects), 12 requests no tool serves
(a plain reply), 4 two-step records (a call, its result, then a final call or reply), 4 parallel calls.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CITIES = ["Paris", "London", "Tokyo", "Oslo", "Lima", "Cairo", "Sydney", "Toronto", "Berlin", "Nairobi"]
CONVERSIONS = [(5, "km", "mi"), (12, "mi", "km"), (3.5, "kg", "lb"), (20, "lb", "kg"), (2, "l", "gal"),
               (10, "gal", "l"), (180, "cm", "in"), (6, "ft", "m")]
EVENTS = [("Dentist", "2025-03-14", "09:30", 45), ("Team standup", "2025-04-02", "10:00", 15),
          ("Call mom", "2025-05-11", None, None), ("Gym", "2025-02-20", "18:00", 60),
          ("Project review", "2025-06-30", "14:00", 90), ("Book club", "2025-07-08", "19:30", None)]
CHATTER = [("Hi there!", "Hello! I can check the weather, convert units or add events to your calendar."),
           ("Thanks, that's all.", "You're welcome, have a good day!"),
           ("What can you do?", "I can look up the current weather, convert units and add calendar events."),
           ("Tell me a joke.", "Why did the calendar feel popular? Its days were numbered."),
           ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
           ("What is 7 times 8?", "7 times 8 is 56."),
           ("Good morning", "Good morning! How can I help?"),
           ("Can you book me a flight to Rome?", "Sorry, I cannot book flights; I can add the trip to your calendar."),
           ("What's the capital of Canada?", "The capital of Canada is Ottawa."),
           ("How do I boil an egg?", "Put the egg in boiling water for about 9 minutes, then cool it in cold water."),
           ("Translate 'cat' into French.", "'Cat' in French is 'chat'."),
           ("Are you a robot?", "I'm an AI assistant for weather, units and your calendar.")]


def call(name: str, arguments: dict, rng: random.Random, call_id: str) -> dict:
    """An OpenAI tool call; arguments as JSON text half the time, as the API writes them."""
    args = json.dumps(arguments) if rng.random() < 0.5 else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def turn(calls: list[dict]) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": calls}


def main() -> None:
    rng = random.Random(0)
    records = []
    n = 0

    def next_id() -> str:
        nonlocal n
        n += 1
        return f"call_{n:03d}"

    for i in range(16):
        city = CITIES[i % len(CITIES)]
        if i % 3 == 0:
            ask, args = f"Is it cold in {city} right now, in fahrenheit?", {"city": city, "unit": "fahrenheit"}
        else:
            ask, args = rng.choice([f"What's the weather in {city}?", f"How is the weather today in {city}?",
                                    f"Weather for {city} please"]), {"city": city}
        records.append([{"role": "user", "content": ask}, turn([call("get_weather", args, rng, next_id())])])
    for i in range(12):
        value, src, dst = CONVERSIONS[i % len(CONVERSIONS)]
        value = value + (i // len(CONVERSIONS)) * 10
        ask = rng.choice([f"Convert {value} {src} to {dst}.", f"How many {dst} is {value} {src}?",
                          f"{value} {src} in {dst}?"])
        args = {"value": value, "from_unit": src, "to_unit": dst}
        records.append([{"role": "user", "content": ask}, turn([call("convert_units", args, rng, next_id())])])
    for i in range(12):
        title, date, time, minutes = EVENTS[i % len(EVENTS)]
        if i >= len(EVENTS):
            date = date[:8] + f"{int(date[8:]) + 7:02d}"
        args = {"title": title, "date": date}
        ask = f"Add '{title}' to my calendar on {date}"
        if time:
            args["time"], ask = time, ask + f" at {time}"
        if minutes:
            args["duration_minutes"], ask = minutes, ask + f" for {minutes} minutes"
        records.append([{"role": "user", "content": ask + "."}, turn([call("create_event", args, rng, next_id())])])
    for ask, reply in CHATTER:
        records.append([{"role": "user", "content": ask}, {"role": "assistant", "content": reply}])
    for city, temperature in (("Oslo", -3), ("Madrid", 21)):
        first = call("get_weather", {"city": city}, rng, next_id())
        result = {"role": "tool", "tool_call_id": first["id"], "content": json.dumps(
            {"city": city, "temperature": temperature, "unit": "celsius"})}
        records.append([{"role": "user", "content": f"If it is freezing in {city}, remind me to take gloves "
                                                   "on 2025-01-15."}, turn([first]), result,
                        turn([call("create_event", {"title": "Take gloves", "date": "2025-01-15"}, rng, next_id())])
                        if temperature <= 0 else
                        {"role": "assistant", "content": f"It is {temperature}°C in {city}, no gloves needed."}])
    for value, src, dst, result_value in ((100, "km", "mi", 62.14), (50, "kg", "lb", 110.23)):
        first = call("convert_units", {"value": value, "from_unit": src, "to_unit": dst}, rng, next_id())
        result = {"role": "tool", "tool_call_id": first["id"], "content": json.dumps({"value": result_value,
                                                                                      "unit": dst})}
        records.append([{"role": "user", "content": f"How much is {value} {src} in {dst}? Then convert that "
                                                   f"back to {src}."}, turn([first]), result,
                        turn([call("convert_units", {"value": result_value, "from_unit": dst, "to_unit": src},
                                    rng, next_id())])])
    for a, b in (("Paris", "London"), ("Tokyo", "Sydney"), ("Berlin", "Cairo"), ("Lima", "Toronto")):
        records.append([{"role": "user", "content": f"Compare the weather in {a} and {b}."},
                        turn([call("get_weather", {"city": a}, rng, next_id()),
                              call("get_weather", {"city": b}, rng, next_id())])])
    lines = [json.dumps({"id": i, "messages": messages}, ensure_ascii=False) for i, messages in enumerate(records)]
    (HERE / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
