"""Writes records.jsonl: order confirmations in prose -> the order as JSON under schema.json.

Deterministic (one seeded generator), so the file can be regenerated and diffed: .venv/bin/python
tests/data/json_schema_task/make_records.py. Strings in the answers (order number, names, e-mail, city, SKUs,
product names) are copied from the text; shipping is the enum value the text's wording means. Completions are
written the way a person would (schema order, gift_wrap before total, some compact), not in the grammar's order
(required properties first), so prepare's canonical form has something to do.
"""

import json
import random
from pathlib import Path

FIRST = ["Maria", "James", "Aiko", "Olu", "Priya", "Lukas", "Sofia", "Mateo", "Hannah", "Wei", "Fatima", "Noah"]
LAST = ["Lopez", "O'Brien", "Tanaka", "Adeyemi", "Sharma", "Becker", "Rossi", "Garcia", "Nguyen", "Chen", "Haddad"]
CITIES = ["Portland", "Austin", "Leeds", "Osaka", "Lyon", "São Paulo", "Toronto", "Cape Town", "Melbourne", "Graz"]
PRODUCTS = [("Blue Mug", "MUG-BL", 7.5), ("Tea Towel", "TT", 4.25), ("Walnut Cutting Board", "CB-WN", 32.0),
            ("Linen Napkins (set of 4)", "NAP-L4", 18.9), ("Cast Iron Skillet", "SK-CI", 44.99),
            ("Bamboo Spatula", "SPT-BB", 3.1), ("Espresso Cups", "ESP", 12.0), ("Ceramic Teapot", "TP-CR", 27.45),
            ("Oven Mitt", "OM", 6.8), ("Glass Storage Jar", "JAR-GL", 9.99)]
SHIPPING = {"standard": ["standard shipping", "Standard delivery", "regular post"],
            "express": ["express shipping", "Express (next day)", "overnight express"],
            "pickup": ["in-store pickup", "pickup at our Main Street store", "collection in store"]}


def money(x: float) -> str:
    return f"{x:.2f}"


def record(rng: random.Random, n: int) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    name = f"{first} {last}"
    email = f"{first.lower()}.{last.lower().replace(chr(39), '')}@example.com" if rng.random() < 0.6 else None
    city = rng.choice(CITIES) if rng.random() < 0.5 else None
    order_id = rng.choice(["A", "WEB-", "SO", "2024-"]) + str(rng.randint(1000, 99999))
    items = []
    for product, prefix, price in rng.sample(PRODUCTS, rng.randint(1, 3)):
        items.append({"sku": f"{prefix}-{rng.randint(1, 99):02d}", "name": product, "quantity": rng.randint(1, 4),
                      "unit_price": price})
    shipping = rng.choice(sorted(SHIPPING))
    gift = rng.choice([True, False, None])
    total = round(sum(i["quantity"] * i["unit_price"] for i in items), 2)

    lines = [f"{i['quantity']} x {i['name']} (SKU {i['sku']}) at ${money(i['unit_price'])} each" for i in items]
    ship_words = rng.choice(SHIPPING[shipping])
    gift_text = {True: "Gift wrap requested. ", False: "No gift wrap. ", None: ""}[gift]
    who = name + (f" <{email}>" if email else "") + (f" from {city}" if city else "")
    style = n % 3
    if style == 0:
        prompt = (f"Order {order_id} confirmed for {who}. Items: {'; '.join(lines)}. Shipping: {ship_words}. "
                  f"{gift_text}Total charged: ${money(total)}.")
    elif style == 1:
        prompt = (f"Hi {first}, thanks for your purchase! Your order #{order_id} contains {', '.join(lines)}. "
                  f"It goes out by {ship_words}. {gift_text}Order total ${money(total)}. "
                  f"(Account: {who})")
    else:
        numbered = " ".join(f"{k}) {line}." for k, line in enumerate(lines, 1))
        prompt = (f"NEW WEB ORDER {order_id}\nCustomer: {who}\nLines: {numbered}\nDelivery method: {ship_words}\n"
                  f"{gift_text}Grand total: {money(total)} USD")

    customer = {"name": name, **({"email": email} if email else {}), **({"city": city} if city else {})}
    answer = {"order_id": order_id, "customer": customer, "items": items, "shipping": shipping,
              **({"gift_wrap": gift} if gift is not None else {}), "total": total}
    compact = n % 5 == 4
    completion = json.dumps(answer, ensure_ascii=False, separators=(",", ":") if compact else None)
    return {"prompt": prompt, "completion": completion}


def main() -> None:
    rng = random.Random(20240611)
    out = Path(__file__).with_name("records.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for n in range(60):
            f.write(json.dumps(record(rng, n), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
