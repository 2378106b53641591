"""A short text table of an evaluation result beside the untrained network's numbers."""
from __future__ import annotations


def _rows(result: dict) -> list[tuple[str, float | None]]:
    rows = [(f"linear {split}", result.get("linear", {}).get(split))
            for split in ("val", "conflict", "outline", "corrupt")]
    rows.append(("shape bias", result.get("shape_bias")))
    for factor, acc in result.get("readout", {}).items():
        rows.append((f"read-out {factor}", acc))
    rows.append(("scramble similarity", result.get("scramble_similarity")))
    return rows


def summary_table(result: dict) -> str:
    """Markdown table: one row per metric present, columns trained and (when given) untrained.

    `result` is what evaluate_checkpoint returns; its "untrained" entry fills the second column.
    """
    ref = result.get("untrained") or {}
    ref_rows = dict(_rows(ref))
    lines = ["| metric | trained | untrained |", "|---|---|---|"]
    for name, value in _rows(result):
        if value is None:
            continue
        other = ref_rows.get(name)
        lines.append(f"| {name} | {value:.3f} | {'-' if other is None else f'{other:.3f}'} |")
    return "\n".join(lines)
