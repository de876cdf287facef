"""The occupancy and webhook keys (docs/redis-contract.md, "Occupancy and
webhook delivery") are spelt the same in the document, in both copies of
occupancy.py, in the dispatcher's contract and in the publisher's."""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher import contract as dispatcher_contract
from dispatcher import occupancy as dispatcher_occupancy
from publisher.contract import Keys
from stream import occupancy

ROOT = Path(__file__).resolve().parents[2]
PARTITION, LANE = 3, 5


def documented_patterns() -> set[str]:
    text = (ROOT / "docs" / "redis-contract.md").read_text()
    section = text[text.index("## Occupancy and webhook delivery") : text.index("## Versions")]
    return set(re.findall(r"^\| `(herald:[^`]+)`", section, re.M))


def concrete(pattern: str) -> str:
    return pattern.replace("<p>", str(PARTITION)).replace("<lane>", str(LANE))


def code_keys() -> set[str]:
    p = PARTITION
    return {
        occupancy.occupied_key(p),
        occupancy.vacating_key(p),
        occupancy.index_key(p),
        occupancy.numbers_key(p),
        occupancy.lane_key(p, LANE),
        dispatcher_contract.dead_key(p),
        dispatcher_contract.lease_key(p, LANE),
        dispatcher_contract.numbers_read_key(p),
        dispatcher_contract.registry_key(),
    }


def test_every_key_the_code_names_is_documented_and_no_other() -> None:
    documented = {concrete(p) for p in documented_patterns()}
    assert code_keys() == documented


def test_the_twins_and_the_publisher_spell_them_alike() -> None:
    p = PARTITION
    assert dispatcher_occupancy.header_keys(p) == occupancy.header_keys(p)
    assert Keys.of(p).occupancy == occupancy.index_key(p)
    assert occupancy.header_keys(p)[: occupancy.HEADER - occupancy.LANES] == [
        occupancy.occupied_key(p),
        occupancy.vacating_key(p),
        occupancy.index_key(p),
        occupancy.numbers_key(p),
    ]
    assert len(occupancy.header_keys(p)) == occupancy.HEADER
