"""A made-up shop for the demo: products, visitors and their sessions, as Segment messages.

    python demo/shop.py --out DIR [--images DIR]

writes ``DIR/shop.jsonl`` (one Segment message a line, oldest first: what a Segment source
would have sent, ready for ``flask --app webhook import``), ``DIR/featured.json`` (the
visitors worth looking at) and, with ``--images``, one SVG picture per product.

Everything comes from a fixed seed and fixed dates, so every run writes the same bytes
(and a second import of the file stores nothing twice). Nothing is downloaded.

The shop: six categories (running, hiking, yoga, cycling, swimming, kitchen), ten product
types in each, five models of each type: 300 products with names, prices and pictures.
Visitors have a favourite category and often a second one; their sessions mostly stay
within them (views, clicks, carts, orders). Most of them identify at some point, with
traits that include ``purchased_products`` (what they ordered, and sometimes something
bought in a store), and one of them opted out of recommendations
(``recommendations_opt_out: true``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.sax.saxutils import escape

SEED = 15
VISITORS = 3000
END = datetime(2026, 11, 1, tzinfo=UTC)  # the last session starts before this
DAYS = 60
IMAGE_PATH = "/static/shop/"  # where the service serves the pictures (webhook/static/shop)

# category: (share of visitors who like it best, background, brands, model names,
#            product types as (name, lowest price, highest price))
CATEGORIES: dict[str, tuple] = {
    "running": (
        0.24,
        "#fff0e6",
        ("Kestrel", "Stride Lab", "Northpace"),
        ("Tempo", "Aero", "Pacer", "Glide", "Sprint", "Cadence", "Vapor"),
        (
            ("Road Running Shoes", 89, 169),
            ("Trail Running Shoes", 99, 179),
            ("Running Shorts", 25, 55),
            ("Running Tee", 20, 45),
            ("Running Socks", 9, 19),
            ("GPS Running Watch", 129, 399),
            ("Hydration Vest", 59, 129),
            ("Running Cap", 15, 30),
            ("Running Jacket", 59, 149),
            ("Headlamp", 25, 69),
        ),
    ),
    "hiking": (
        0.18,
        "#eaf5e4",
        ("Ridgeline", "Cairn & Co", "Alpenglow"),
        ("Summit", "Scree", "Tundra", "Ranger", "Crest", "Basecamp", "Switchback"),
        (
            ("Hiking Boots", 119, 249),
            ("Daypack", 49, 129),
            ("Trekking Poles", 39, 119),
            ("Fleece Jacket", 49, 129),
            ("Water Filter", 25, 59),
            ("Two-Person Tent", 149, 399),
            ("Sleeping Bag", 89, 259),
            ("Sun Hat", 19, 39),
            ("Hiking Socks", 12, 24),
            ("Compass", 19, 49),
        ),
    ),
    "yoga": (
        0.15,
        "#f3ecfa",
        ("Lotus Loom", "Still Point", "Asana Works"),
        ("Flow", "Zen", "Balance", "Harmony", "Prana", "Lunar", "Calm"),
        (
            ("Yoga Mat", 29, 119),
            ("Yoga Blocks", 15, 35),
            ("Yoga Strap", 9, 19),
            ("Yoga Leggings", 39, 89),
            ("Bolster", 39, 79),
            ("Mat Towel", 19, 39),
            ("Meditation Cushion", 29, 69),
            ("Yoga Wheel", 25, 49),
            ("Mat Bag", 19, 45),
            ("Cork Roller", 19, 39),
        ),
    ),
    "cycling": (
        0.20,
        "#e6f1fb",
        ("Velotide", "Chainring", "Spokesmith"),
        ("Aero", "Gravel", "Climber", "Peloton", "Echelon", "Cols", "Fixie"),
        (
            ("Road Helmet", 59, 199),
            ("Cycling Jersey", 45, 119),
            ("Bib Shorts", 59, 159),
            ("Cycling Gloves", 19, 49),
            ("Bike Light Set", 29, 89),
            ("Water Bottle", 8, 18),
            ("Saddle Bag", 19, 49),
            ("Mini Pump", 19, 45),
            ("Bike Computer", 99, 349),
            ("Bike Lock", 29, 89),
        ),
    ),
    "swimming": (
        0.10,
        "#e4f6f6",
        ("Tidewell", "Lanefour", "Blue Marlin"),
        ("Riptide", "Lap", "Current", "Reef", "Torpedo", "Delta", "Open Water"),
        (
            ("Swim Goggles", 12, 45),
            ("Swim Cap", 8, 19),
            ("Swimsuit", 29, 89),
            ("Kickboard", 12, 25),
            ("Swim Fins", 25, 59),
            ("Hand Paddles", 12, 29),
            ("Microfibre Towel", 15, 35),
            ("Swim Bag", 19, 49),
            ("Ear Plugs", 5, 12),
            ("Pull Buoy", 9, 19),
        ),
    ),
    "kitchen": (
        0.13,
        "#fbf3e1",
        ("Copper Hen", "Larder", "Ironwood"),
        ("Classic", "Pro", "Heritage", "Bistro", "Nordic", "Artisan", "Everyday"),
        (
            ("Chef's Knife", 39, 189),
            ("Frying Pan", 29, 119),
            ("Cutting Board", 19, 79),
            ("Coffee Grinder", 39, 149),
            ("Dutch Oven", 59, 249),
            ("Espresso Pot", 25, 69),
            ("Salad Spinner", 19, 39),
            ("Spatula Set", 12, 29),
            ("Mixing Bowls", 19, 59),
            ("Stoneware Mugs", 19, 45),
        ),
    ),
}
MODELS_PER_TYPE = 5
COLOURS = (
    "#e8590c",
    "#1c7ed6",
    "#2f9e44",
    "#ae3ec9",
    "#f08c00",
    "#c2255c",
    "#0b7285",
    "#495057",
    "#5f3dc4",
    "#d6336c",
)
FIRST_NAMES = (
    "Ada",
    "Ben",
    "Chloe",
    "Dev",
    "Elif",
    "Femi",
    "Greta",
    "Hugo",
    "Ines",
    "Jon",
    "Kira",
    "Leo",
    "Maya",
    "Nils",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tess",
    "Uma",
    "Vik",
    "Wren",
    "Yara",
    "Zeno",
)

# Visitors worth a look, at fixed places in the visitor list: one category only, or opted out.
# Their ids fall in the local engine's half of the demo's experiment (EXPERIMENT=local:50,
# popular:50), so their pages show what the engine does.
FEATURED = {
    17: ("a runner (browsed and bought running gear only)", "running", False),
    258: ("a cyclist (cycling gear only)", "cycling", False),
    1025: ("a yoga fan who opted out of recommendations (popular items instead)", "yoga", True),
}


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    category: str
    kind: str
    brand: str
    price: float
    colour: str
    popularity: float  # how often visitors pick it within its category

    def properties(self) -> dict:
        return {
            "product_id": self.id,
            "name": self.name,
            "category": self.category,
            "brand": self.brand,
            "price": self.price,
            "image_url": f"{IMAGE_PATH}{self.id}.svg",
        }


@dataclass(frozen=True)
class Person:
    user_id: str | None  # None: never identified
    primary: str  # the favourite category
    secondary: str | None
    opted_out: bool


def make_products(rng: random.Random) -> list[Product]:
    products = []
    for category, (_, _, brands, models, kinds) in CATEGORIES.items():
        members = []
        for kind, low, high in kinds:
            for model in rng.sample(models, MODELS_PER_TYPE):
                brand = rng.choice(brands)
                members.append(
                    Product(
                        id=f"{category}-{len(members) + 1:03d}",
                        name=f"{brand} {model} {kind}",
                        category=category,
                        kind=kind,
                        brand=brand,
                        price=round(rng.uniform(low, high)) - 0.01,
                        colour=rng.choice(COLOURS),
                        popularity=0.0,
                    )
                )
        # Popularity within a category: a long tail (a few favourites, many rarely seen).
        order = list(range(len(members)))
        rng.shuffle(order)
        products += [
            replace(p, popularity=1.0 / (rank + 1) ** 0.8) for rank, p in zip(order, members)
        ]
    return products


class Shop:
    def __init__(self, seed: int = SEED, visitors: int = VISITORS):
        self.rng = random.Random(seed)
        self.products = make_products(self.rng)
        self.by_category = {c: [p for p in self.products if p.category == c] for c in CATEGORIES}
        self.by_kind: dict[tuple[str, str], list[Product]] = {}
        for p in self.products:
            self.by_kind.setdefault((p.category, p.kind), []).append(p)
        self.visitors = visitors
        self.messages: list[dict] = []
        self.featured: list[dict] = []
        self.people: list[Person] = []  # every visitor and their tastes
        self._sequence = 0

    # -- messages ---------------------------------------------------------------------------

    def _message(self, kind: str, when: datetime, who: dict, **fields) -> dict:
        self._sequence += 1
        message = {
            "type": kind,
            "messageId": f"shop-{self._sequence:07d}",
            **who,
            "timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
            **fields,
        }
        self.messages.append(message)
        return message

    def _track(self, event: str, when: datetime, who: dict, properties: dict) -> None:
        self._message("track", when, who, event=event, properties=properties)

    # -- visitors ---------------------------------------------------------------------------

    def pick(self, category: str, exclude: set[str] = frozenset()) -> Product:
        members = [
            p for p in self.by_category[category] if p.id not in exclude
        ] or self.by_category[category]
        return self.rng.choices(members, weights=[p.popularity for p in members])[0]

    def generate(self) -> None:
        names = list(CATEGORIES)
        shares = [CATEGORIES[c][0] for c in names]
        for number in range(1, self.visitors + 1):
            featured = FEATURED.get(number)
            if featured:
                primary, secondary, opted_out = featured[1], None, featured[2]
            else:
                primary = self.rng.choices(names, weights=shares)[0]
                secondary = (
                    self.rng.choice([c for c in names if c != primary])
                    if self.rng.random() < 0.6
                    else None
                )
                opted_out = False
            user_id = self.visitor(
                number,
                primary,
                secondary,
                opted_out,
                identified=bool(featured) or self.rng.random() < 0.7,
                sessions=3 if featured else None,
            )
            self.people.append(Person(user_id, primary, secondary, opted_out))
            if featured:
                self.featured.append(
                    {
                        "description": featured[0],
                        "userId": user_id,
                        "category": primary,
                        "opted_out": opted_out,
                    }
                )
        # What a Segment archive holds: messages in time order.
        self.messages.sort(key=lambda m: (m["timestamp"], m["messageId"]))

    def visitor(
        self,
        number: int,
        primary: str,
        secondary: str | None,
        opted_out: bool,
        identified: bool,
        sessions: int | None,
    ) -> str | None:
        rng = self.rng
        anonymous_id = f"anon-{rng.getrandbits(64):016x}"
        user_id = f"user-{number:04d}" if identified else None
        count = sessions or rng.choices((1, 2, 3, 4, 5), weights=(35, 28, 18, 11, 8))[0]
        starts = sorted(END - timedelta(seconds=rng.uniform(0, DAYS * 86400)) for _ in range(count))
        identify_at = rng.randrange(count) if identified else None
        if sessions:  # a featured visitor is known from the start
            identify_at = 0
        ordered: list[str] = []
        seen: set[str] = set()
        name = f"{rng.choice(FIRST_NAMES)} {chr(65 + rng.randrange(26))}."
        for index, start in enumerate(starts):
            who = {"anonymousId": anonymous_id}
            if identify_at is not None and index >= identify_at:
                who["userId"] = user_id
            if index == identify_at:
                self._message("identify", start, who, traits={"name": name})
            ordered += self.session(start, who, primary, secondary, seen, pure=sessions is not None)
        if user_id:
            # A profile trait as Segment's Profiles would compute it: every order, and now
            # and then something bought in a store (the service never saw that order).
            purchased = list(dict.fromkeys(ordered))
            if sessions or rng.random() < 0.3:
                purchased.append(self.pick(primary, exclude=seen).id)
            traits: dict = {"name": name, "purchased_products": purchased}
            if opted_out:
                traits["recommendations_opt_out"] = True
            self._message(
                "identify",
                starts[-1] + timedelta(hours=2),
                {"userId": user_id, "anonymousId": anonymous_id},
                traits=traits,
            )
        return user_id

    def session(
        self,
        start: datetime,
        who: dict,
        primary: str,
        secondary: str | None,
        seen: set[str],
        pure: bool,
    ) -> list[str]:
        rng = self.rng
        when = start

        def later() -> datetime:
            nonlocal when
            when += timedelta(seconds=rng.uniform(15, 120), milliseconds=rng.randrange(1000))
            return when

        def taste() -> str:
            roll = rng.random()
            if pure or roll < (0.8 if secondary else 0.93):
                return primary
            if secondary and roll < 0.95:
                return secondary
            return rng.choice(list(CATEGORIES))

        category = taste()
        product = self.pick(category)
        cart: list[Product] = []
        for _ in range(rng.randint(2, 8)):
            properties = product.properties()
            if rng.random() < 0.35:  # came from a list or a recommendation
                self._track("Product Clicked", later(), who, properties)
            self._track("Product Viewed", later(), who, properties)
            seen.add(product.id)
            roll = rng.random()
            if roll < 0.18:
                self._track("Product Added", later(), who, {**properties, "quantity": 1})
                cart.append(product)
            elif roll < 0.21:
                self._track("Product Added to Wishlist", later(), who, properties)
            # Next: another model of the same type, another type of the same category, or
            # now and then whatever the visitor fancies.
            roll = rng.random()
            if roll < 0.45:
                product = rng.choice(self.by_kind[(product.category, product.kind)])
            elif roll < 0.9:
                product = self.pick(product.category)
            else:
                product = self.pick(taste())
        if not cart or rng.random() > 0.55:
            return []
        products = [{**p.properties(), "quantity": 1} for p in dict.fromkeys(cart)]
        self._track(
            "Order Completed",
            later(),
            who,
            {
                "order_id": f"order-{self._sequence + 1:07d}",
                "currency": "USD",
                "revenue": round(sum(p["price"] for p in products), 2),
                "products": products,
            },
        )
        return [p["product_id"] for p in products]


# -- pictures ------------------------------------------------------------------------------

D = "#343a40"  # dark details: soles, straps, handles
L = "#ffffff"  # light details (drawn semi-transparent)

# One simple drawing per kind of product, in the product's colour ({c}), on a 400 × 300
# canvas: a headlamp should not look like a shoe.
_SHAPES = {
    "shoe": "<path d='M105 192 L122 118 Q150 104 170 122 L200 150 Q250 160 290 170 Q312 178 "
    "306 198 Z' fill='{c}'/><rect x='100' y='196' width='210' height='14' rx='7' "
    "fill='D'/><path d='M150 132 l18 14 M162 122 l18 14' stroke='L' stroke-width='5' "
    "stroke-linecap='round'/>",
    "boot": "<path d='M135 70 H195 L200 150 Q255 158 288 176 Q302 188 294 200 H128 Z' "
    "fill='{c}'/><rect x='122' y='198' width='180' height='16' rx='6' fill='D'/>"
    "<path d='M160 95 h30 M160 115 h32 M160 135 h34' stroke='L' stroke-width='5' "
    "stroke-linecap='round'/>",
    "shorts": "<path d='M130 80 H270 L288 210 H215 L200 130 L185 210 H112 Z' fill='{c}'/>"
    "<rect x='130' y='72' width='140' height='16' rx='4' fill='D'/>",
    "leggings": "<path d='M150 60 H250 L262 232 H224 L200 112 L176 232 H138 Z' fill='{c}'/>"
    "<rect x='150' y='54' width='100' height='14' rx='4' fill='D'/>",
    "shirt": "<path d='M160 70 L118 96 L134 132 L160 120 V215 H240 V120 L266 132 L282 96 "
    "L240 70 Q200 96 160 70 Z' fill='{c}'/>",
    "jacket": "<path d='M160 70 L116 100 L120 204 H146 L160 126 V215 H240 V126 L254 204 H280 "
    "L284 100 L240 70 Q200 90 160 70 Z' fill='{c}'/><path d='M200 84 V215' "
    "stroke='D' stroke-width='4'/>",
    "vest": "<path d='M165 66 L148 110 V215 H252 V110 L235 66 Q200 112 165 66 Z' fill='{c}'/>"
    "<rect x='165' y='140' width='24' height='34' rx='5' fill='D' opacity='.5'/>"
    "<rect x='211' y='140' width='24' height='34' rx='5' fill='D' opacity='.5'/>",
    "swimsuit": "<path d='M168 62 H180 Q200 112 220 62 H232 L236 130 Q240 172 252 206 "
    "Q200 188 148 206 Q160 172 164 130 Z' fill='{c}'/>",
    "sock": "<path d='M170 62 H226 V150 L270 184 Q292 204 262 218 H182 Q164 214 170 194 Z' "
    "fill='{c}'/><rect x='166' y='56' width='64' height='20' rx='4' fill='D'/>",
    "watch": "<rect x='178' y='52' width='44' height='176' rx='10' fill='D'/>"
    "<circle cx='200' cy='140' r='50' fill='{c}'/><circle cx='200' cy='140' r='37' "
    "fill='L'/><path d='M200 140 V114 M200 140 L218 150' stroke='D' stroke-width='5' "
    "stroke-linecap='round'/>",
    "device": "<rect x='178' y='50' width='44' height='180' rx='10' fill='D'/>"
    "<rect x='140' y='86' width='120' height='108' rx='16' fill='{c}'/>"
    "<rect x='154' y='100' width='92' height='64' rx='6' fill='L'/>"
    "<path d='M164 150 l18 -20 l16 12 l26 -28' stroke='D' stroke-width='5' "
    "fill='none'/>",
    "compass": "<circle cx='200' cy='140' r='68' fill='{c}'/><circle cx='200' cy='140' r='54' "
    "fill='L'/><polygon points='200,92 212,140 188,140' fill='#e03131'/>"
    "<polygon points='200,188 212,140 188,140' fill='D'/>",
    "cap": "<path d='M120 172 Q124 88 200 84 Q276 88 280 172 Z' fill='{c}'/>"
    "<path d='M270 160 Q322 164 336 186 H266 Z' fill='D'/>",
    "hat": "<ellipse cx='200' cy='180' rx='124' ry='26' fill='{c}'/><path d='M144 180 Q148 98 "
    "200 98 Q252 98 256 180 Z' fill='{c}'/><rect x='146' y='152' width='108' height='14' "
    "fill='D'/>",
    "helmet": "<path d='M104 178 Q110 84 200 78 Q290 84 296 178 Z' fill='{c}'/><path d='M150 "
    "100 l10 40 M200 90 v44 M250 100 l-10 40' stroke='D' stroke-width='10' "
    "stroke-linecap='round'/><path d='M140 178 L175 222 H225 L260 178' stroke='D' "
    "stroke-width='5' fill='none'/>",
    "swimcap": "<path d='M118 186 Q122 80 200 74 Q278 80 282 186 Q200 204 118 186 Z' fill='{c}'/>",
    "headlamp": "<ellipse cx='200' cy='132' rx='104' ry='62' fill='none' stroke='D' "
    "stroke-width='12'/><rect x='158' y='150' width='84' height='58' rx='12' "
    "fill='{c}'/><circle cx='200' cy='179' r='19' fill='#ffe066'/>",
    "light": "<rect x='112' y='110' width='124' height='64' rx='16' fill='{c}'/>"
    "<circle cx='236' cy='142' r='26' fill='#ffe066'/><path d='M272 114 l36 -18 "
    "M276 142 h42 M272 170 l36 18' stroke='#f59f00' stroke-width='7' "
    "stroke-linecap='round'/>",
    "backpack": "<path d='M140 86 Q140 60 200 60 Q260 60 260 86 V216 H140 Z' fill='{c}'/>"
    "<rect x='160' y='150' width='80' height='48' rx='8' fill='D' opacity='.35'/>"
    "<path d='M180 62 Q200 36 220 62' stroke='D' stroke-width='8' fill='none'/>",
    "bag": "<rect x='108' y='112' width='184' height='94' rx='40' fill='{c}'/>"
    "<path d='M160 114 Q200 58 240 114' stroke='D' stroke-width='10' fill='none'/>"
    "<path d='M130 140 H270' stroke='L' stroke-width='5' opacity='.7'/>",
    "poles": "<path d='M172 54 L150 226 M228 54 L250 226' stroke='D' stroke-width='8' "
    "stroke-linecap='round'/><rect x='160' y='48' width='24' height='50' rx='8' "
    "fill='{c}' transform='rotate(7 172 73)'/><rect x='216' y='48' width='24' "
    "height='50' rx='8' fill='{c}' transform='rotate(-7 228 73)'/>"
    "<ellipse cx='152' cy='206' rx='16' ry='5' fill='{c}'/><ellipse cx='248' "
    "cy='206' rx='16' ry='5' fill='{c}'/>",
    "bottle": "<rect x='168' y='88' width='64' height='134' rx='20' fill='{c}'/>"
    "<rect x='184' y='62' width='32' height='32' rx='6' fill='D'/>"
    "<rect x='168' y='130' width='64' height='40' fill='L' opacity='.4'/>",
    "tent": "<path d='M88 212 L200 68 L312 212 Z' fill='{c}'/><path d='M200 68 L168 212 H232 Z' "
    "fill='D' opacity='.45'/><path d='M70 214 H330' stroke='D' stroke-width='6'/>",
    "roll": "<rect x='106' y='104' width='180' height='72' fill='{c}'/><ellipse cx='286' "
    "cy='140' rx='20' ry='36' fill='{c}'/><ellipse cx='286' cy='140' rx='14' ry='28' "
    "fill='L' opacity='.35'/><ellipse cx='286' cy='140' rx='6' ry='12' fill='{c}'/>",
    "sleepingbag": "<path d='M110 118 Q110 86 150 86 H300 Q318 86 318 140 Q318 194 300 194 "
    "H150 Q110 194 110 162 Z' fill='{c}'/><ellipse cx='148' cy='140' rx='26' "
    "ry='34' fill='D' opacity='.4'/><path d='M190 96 V184 M240 96 V184' "
    "stroke='L' stroke-width='4' opacity='.6'/>",
    "block": "<path d='M130 120 L200 94 L270 120 L200 146 Z' fill='{c}' opacity='.7'/>"
    "<path d='M130 120 L200 146 V212 L130 186 Z' fill='{c}'/>"
    "<path d='M200 146 L270 120 V186 L200 212 Z' fill='D' opacity='.55'/>",
    "strap": "<ellipse cx='200' cy='140' rx='104' ry='54' fill='none' stroke='{c}' "
    "stroke-width='18'/><rect x='86' y='118' width='30' height='44' rx='6' fill='D'/>",
    "wheel": "<circle cx='200' cy='140' r='74' fill='none' stroke='{c}' stroke-width='30'/>"
    "<circle cx='200' cy='140' r='90' fill='none' stroke='D' stroke-width='3'/>",
    "towel": "<rect x='118' y='86' width='164' height='126' rx='12' fill='{c}'/>"
    "<rect x='118' y='180' width='164' height='10' fill='L' opacity='.6'/>"
    "<rect x='118' y='196' width='164' height='6' fill='L' opacity='.6'/>",
    "cushion": "<ellipse cx='200' cy='168' rx='104' ry='44' fill='{c}'/><ellipse cx='200' "
    "cy='150' rx='100' ry='38' fill='{c}'/><ellipse cx='200' cy='150' rx='100' "
    "ry='38' fill='L' opacity='.2'/><circle cx='200' cy='150' r='7' fill='D'/>",
    "glove": "<path d='M146 212 V112 Q146 76 182 76 H214 Q250 76 250 112 V212 Z' fill='{c}'/>"
    "<path d='M146 144 Q108 134 112 106 Q118 90 134 98 L146 114 Z' fill='{c}'/>"
    "<rect x='140' y='196' width='116' height='24' rx='4' fill='D'/>",
    "pump": "<rect x='184' y='84' width='32' height='134' rx='8' fill='{c}'/>"
    "<rect x='152' y='66' width='96' height='16' rx='6' fill='D'/>"
    "<path d='M200 70 V84' stroke='D' stroke-width='8'/><path d='M216 200 Q270 210 "
    "266 160' stroke='D' stroke-width='6' fill='none'/>",
    "lock": "<path d='M152 132 V100 Q152 58 200 58 Q248 58 248 100 V132' stroke='D' "
    "stroke-width='18' fill='none'/><rect x='128' y='124' width='144' height='92' "
    "rx='12' fill='{c}'/><circle cx='200' cy='162' r='10' fill='D'/><rect x='196' "
    "y='166' width='8' height='24' fill='D'/>",
    "goggles": "<path d='M90 140 H310' stroke='D' stroke-width='8'/><ellipse cx='160' "
    "cy='140' rx='42' ry='30' fill='{c}'/><ellipse cx='240' cy='140' rx='42' "
    "ry='30' fill='{c}'/><ellipse cx='160' cy='136' rx='28' ry='17' fill='L' "
    "opacity='.45'/><ellipse cx='240' cy='136' rx='28' ry='17' fill='L' "
    "opacity='.45'/>",
    "kickboard": "<path d='M130 216 V112 Q130 60 200 60 Q270 60 270 112 V216 Z' fill='{c}'/>"
    "<rect x='170' y='86' width='60' height='18' rx='9' fill='L' opacity='.6'/>",
    "paddles": "<rect x='112' y='70' width='80' height='140' rx='30' fill='{c}'/><rect "
    "x='208' y='70' width='80' height='140' rx='30' fill='{c}'/><path d='M152 100 "
    "v80 M248 100 v80' stroke='D' stroke-width='6' stroke-linecap='round'/>",
    "fin": "<path d='M172 60 Q160 60 160 80 L148 202 Q200 232 252 202 L240 80 Q240 60 228 60 "
    "Z' fill='{c}'/><ellipse cx='200' cy='92' rx='30' ry='20' fill='D'/>",
    "plugs": "<path d='M166 170 Q200 220 234 170' stroke='D' stroke-width='4' fill='none'/>"
    "<circle cx='166' cy='140' r='28' fill='{c}'/><circle cx='234' cy='140' r='28' "
    "fill='{c}'/>",
    "buoy": "<path d='M140 86 Q200 112 260 86 V126 Q200 148 140 126 Z' fill='{c}'/><path "
    "d='M140 156 Q200 180 260 156 V196 Q200 220 140 196 Z' fill='{c}'/>"
    "<rect x='184' y='118' width='32' height='52' fill='D'/>",
    "knife": "<path d='M86 150 L252 120 V166 Q170 172 86 150 Z' fill='#ced4da'/><rect "
    "x='250' y='124' width='84' height='38' rx='10' fill='{c}'/><circle cx='276' "
    "cy='143' r='4' fill='L'/><circle cx='306' cy='143' r='4' fill='L'/>",
    "pan": "<circle cx='176' cy='150' r='66' fill='{c}'/><circle cx='176' cy='150' r='48' "
    "fill='L' fill-opacity='0.25'/><rect x='236' y='140' width='104' height='20' "
    "rx='10' fill='D'/>",
    "board": "<rect x='104' y='88' width='192' height='126' rx='16' fill='{c}'/><circle "
    "cx='268' cy='114' r='12' fill='L' opacity='.8'/><path d='M124 196 H250' "
    "stroke='D' stroke-width='3' opacity='.4'/>",
    "grinder": "<rect x='148' y='122' width='104' height='94' rx='6' fill='{c}'/><path "
    "d='M158 122 L174 82 H226 L242 122 Z' fill='D' opacity='.6'/><path d='M200 82 "
    "V66 H246' stroke='D' stroke-width='6' fill='none'/><circle cx='248' cy='66' "
    "r='9' fill='{c}'/>",
    "pot": "<path d='M118 118 H282 V186 Q282 212 256 212 H144 Q118 212 118 186 Z' "
    "fill='{c}'/><path d='M112 112 Q200 70 288 112 Z' fill='D'/><circle cx='200' "
    "cy='84' r='9' fill='D'/><rect x='96' y='132' width='24' height='14' rx='6' "
    "fill='D'/><rect x='280' y='132' width='24' height='14' rx='6' fill='D'/>",
    "moka": "<path d='M160 212 L150 148 H250 L240 212 Z' fill='{c}'/><path d='M166 148 "
    "L178 78 H222 L234 148 Z' fill='{c}'/><path d='M234 96 Q276 104 262 140' "
    "stroke='D' stroke-width='10' fill='none'/><circle cx='200' cy='72' r='8' "
    "fill='D'/>",
    "bowl": "<path d='M106 128 H294 Q288 214 200 214 Q112 214 106 128 Z' fill='{c}'/>"
    "<ellipse cx='200' cy='128' rx='94' ry='14' fill='D' opacity='.35'/>",
    "spatula": "<path d='M160 56 V140 M240 56 V140' stroke='D' stroke-width='12' "
    "stroke-linecap='round'/><path d='M136 140 H184 V206 Q160 216 136 206 Z' "
    "fill='{c}'/><ellipse cx='240' cy='176' rx='26' ry='36' fill='{c}'/><path "
    "d='M200 56 V200' stroke='{c}' stroke-width='10' stroke-linecap='round'/>",
    "mug": "<path d='M248 112 Q292 112 292 150 Q292 188 248 188' stroke='{c}' "
    "stroke-width='16' fill='none'/><rect x='136' y='92' width='116' height='124' "
    "rx='12' fill='{c}'/><path d='M170 78 q-10 -14 0 -28 M206 78 q-10 -14 0 -28' "
    "stroke='#adb5bd' stroke-width='5' fill='none' stroke-linecap='round'/>",
}
_SHAPE_OF = {
    "Road Running Shoes": "shoe",
    "Trail Running Shoes": "shoe",
    "Running Shorts": "shorts",
    "Running Tee": "shirt",
    "Running Socks": "sock",
    "GPS Running Watch": "watch",
    "Hydration Vest": "vest",
    "Running Cap": "cap",
    "Running Jacket": "jacket",
    "Headlamp": "headlamp",
    "Hiking Boots": "boot",
    "Daypack": "backpack",
    "Trekking Poles": "poles",
    "Fleece Jacket": "jacket",
    "Water Filter": "bottle",
    "Two-Person Tent": "tent",
    "Sleeping Bag": "sleepingbag",
    "Sun Hat": "hat",
    "Hiking Socks": "sock",
    "Compass": "compass",
    "Yoga Mat": "roll",
    "Yoga Blocks": "block",
    "Yoga Strap": "strap",
    "Yoga Leggings": "leggings",
    "Bolster": "roll",
    "Mat Towel": "towel",
    "Meditation Cushion": "cushion",
    "Yoga Wheel": "wheel",
    "Mat Bag": "bag",
    "Cork Roller": "roll",
    "Road Helmet": "helmet",
    "Cycling Jersey": "shirt",
    "Bib Shorts": "shorts",
    "Cycling Gloves": "glove",
    "Bike Light Set": "light",
    "Water Bottle": "bottle",
    "Saddle Bag": "bag",
    "Mini Pump": "pump",
    "Bike Computer": "device",
    "Bike Lock": "lock",
    "Swim Goggles": "goggles",
    "Swim Cap": "swimcap",
    "Swimsuit": "swimsuit",
    "Kickboard": "kickboard",
    "Swim Fins": "fin",
    "Hand Paddles": "paddles",
    "Microfibre Towel": "towel",
    "Swim Bag": "bag",
    "Ear Plugs": "plugs",
    "Pull Buoy": "buoy",
    "Chef's Knife": "knife",
    "Frying Pan": "pan",
    "Cutting Board": "board",
    "Coffee Grinder": "grinder",
    "Dutch Oven": "pot",
    "Espresso Pot": "moka",
    "Salad Spinner": "bowl",
    "Spatula Set": "spatula",
    "Mixing Bowls": "bowl",
    "Stoneware Mugs": "mug",
}


def svg(product: Product) -> str:
    background = CATEGORIES[product.category][1]
    shape = (
        _SHAPES[_SHAPE_OF[product.kind]]
        .replace("{c}", product.colour)
        .replace("'D'", f"'{D}'")
        .replace("'L'", f"'{L}'")
    )
    return (
        "<svg xmlns='http://www.w3.org/2000/svg' width='400' height='300' "
        "viewBox='0 0 400 300'>"
        f"<rect width='400' height='300' fill='{background}'/>{shape}"
        "<text x='200' y='264' font-family='sans-serif' font-size='22' font-weight='600' "
        f"fill='{D}' text-anchor='middle'>{escape(product.kind)}</text>"
        "<text x='16' y='30' font-family='sans-serif' font-size='15' "
        f"fill='#868e96'>{escape(product.brand)}</text>"
        "<text x='384' y='30' font-family='sans-serif' font-size='15' fill='#868e96' "
        f"text-anchor='end'>{product.category}</text></svg>\n"
    )


# -- the experiment: visitors who see answers and act on them -------------------------------

# How likely a visitor is to click a recommended product: far more often when it is of a
# category they like. Nothing here knows which recommender chose the products: whichever
# shows visitors more of what they like earns more clicks, carts and orders.
CLICK_FAVOURITE, CLICK_SECOND, CLICK_OTHER = 0.12, 0.06, 0.015
ADD_AFTER_CLICK, ORDER_AFTER_ADD = 0.35, 0.5
EXPERIMENT_SEED = SEED + 29
RETURNING_SHARE = 0.8  # of each day's visitors, people with a history in the shop


@dataclass(frozen=True)
class Visit:
    who: dict  # {"userId": …} or {"anonymousId": …}
    primary: str
    secondary: str | None


def experiment_days(
    shop: Shop, days: int, per_day: int, seed: int = EXPERIMENT_SEED
) -> list[list[Visit]]:
    """``days`` days of ``per_day`` visits each: mostly people with a history (identified,
    not opted out), some of them on several days, and new anonymous visitors."""
    rng = random.Random(seed)
    known = [p for p in shop.people if p.user_id and not p.opted_out]
    names = list(CATEGORIES)
    shares = [CATEGORIES[c][0] for c in names]
    plan = []
    for day in range(days):
        returning = round(per_day * RETURNING_SHARE)
        visits = [
            Visit({"userId": p.user_id}, p.primary, p.secondary)
            for p in rng.sample(known, returning)
        ]
        for n in range(per_day - returning):
            primary = rng.choices(names, weights=shares)[0]
            visits.append(Visit({"anonymousId": f"new-{day:02d}-{n:03d}"}, primary, None))
        rng.shuffle(visits)
        plan.append(visits)
    return plan


def react(
    rng: random.Random, shop: Shop, visit: Visit, answer: dict, when: datetime, number: int
) -> list[dict]:
    """What the visitor does with an answer of GET /recommendations: Segment track
    messages carrying the answer's ``recommendation_id`` (clicks, add-to-carts, an order),
    timed ``when``."""
    by_id = {p.id: p for p in shop.products}
    rid = answer["recommendationId"]
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    events: list[dict] = []
    ordered: list[Product] = []
    for position, item in enumerate(answer["itemList"], start=1):
        product = by_id.get(item["itemId"])
        if product is None:
            continue
        chance = (
            CLICK_FAVOURITE
            if product.category == visit.primary
            else CLICK_SECOND
            if product.category == visit.secondary
            else CLICK_OTHER
        )
        if rng.random() >= chance:
            continue
        properties = {**product.properties(), "recommendation_id": rid, "position": position}
        events.append(("Product Clicked", properties))
        if rng.random() < ADD_AFTER_CLICK:
            events.append(("Product Added", {**properties, "quantity": 1}))
            if rng.random() < ORDER_AFTER_ADD:
                ordered.append(product)
    if ordered:
        events.append(
            (
                "Order Completed",
                {
                    "order_id": f"demo-order-{number:05d}",
                    "revenue": round(sum(p.price for p in ordered), 2),
                    "products": [
                        {**p.properties(), "quantity": 1, "recommendation_id": rid} for p in ordered
                    ],
                },
            )
        )
    return [
        {
            "type": "track",
            "event": event,
            "properties": properties,
            **visit.who,
            "messageId": f"demo-{number:05d}-{index}",
            "timestamp": stamp,
        }
        for index, (event, properties) in enumerate(events)
    ]


# -- output --------------------------------------------------------------------------------


def write(out: Path, images: Path | None, seed: int = SEED, visitors: int = VISITORS) -> Shop:
    shop = Shop(seed, visitors)
    shop.generate()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "shop.jsonl", "w", encoding="utf-8", newline="\n") as handle:
        for message in shop.messages:
            handle.write(json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n")
    (out / "featured.json").write_text(json.dumps(shop.featured, indent=2) + "\n")
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        for product in shop.products:
            target = images / f"{product.id}.svg"
            picture = svg(product)
            if not target.exists() or target.read_text() != picture:
                target.write_text(picture)
    return shop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for shop.jsonl and featured.json"
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="folder for the product pictures (the service serves "
        "webhook/static/shop as /static/shop)",
    )
    parser.add_argument("--visitors", type=int, default=VISITORS)
    args = parser.parse_args(argv)
    shop = write(args.out, args.images, visitors=args.visitors)
    kinds = {}
    for message in shop.messages:
        key = message.get("event") or message["type"]
        kinds[key] = kinds.get(key, 0) + 1
    print(
        f"{len(shop.products)} products in {len(CATEGORIES)} categories, "
        f"{shop.visitors} visitors, {len(shop.messages)} messages: "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
