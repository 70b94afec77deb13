"""The benchmark table's rows: shared by the runner and every section module."""

from __future__ import annotations

COLUMNS = ("section", "measurement", "interplab", "peer", "interplab / peer", "note")


def ratio(a, b) -> float | None:
    try:
        return round(float(a) / float(b), 3) if float(b) != 0 else None
    except (TypeError, ValueError):
        return None


def row(section, measurement, ours, peer=None, note="", with_ratio: bool = True) -> dict:
    """One measurement: interplab's figure, the peer's (if any) and their ratio."""
    return {"section": section, "measurement": measurement, "interplab": ours, "peer": peer,
            "ratio": ratio(ours, peer) if with_ratio and peer is not None else None, "note": note}


def mean(xs) -> float:
    return round(sum(xs) / len(xs), 4)
