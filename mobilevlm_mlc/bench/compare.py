"""`compare`: benchmark results (ours and the peers') side by side, with ratios against a baseline,
as a terminal table and a PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mobilevlm_mlc.errors import MobileVLMError

from .benchmark import SCHEMA


def load_results(paths: list[Path]) -> list[dict]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MobileVLMError(f"{path}: not a readable benchmark result ({err})") from None
        except UnicodeDecodeError:
            raise MobileVLMError(f"{path}: not a readable benchmark result (not UTF-8 text)") from None
        if not isinstance(result, dict):
            raise MobileVLMError(
                f"{path}: a JSON {type(result).__name__}, expected a benchmark result object (written by "
                "`mobilevlm-mlc bench`)"
            )
        if result.get("schema") != SCHEMA:
            found = f"is {result['schema']!r}" if "schema" in result else "is missing"
            raise MobileVLMError(
                f"{path}: field 'schema' {found}, expected {SCHEMA!r} (written by `mobilevlm-mlc bench`)"
            )
        _check_result(path, result)
        results.append(result)
    return results


def _check_result(path: Path, result: dict) -> None:
    """The fields `table` and `chart` read: a label, an environment, and each figure as {"median": number}."""

    def bad(field: str, expected: str) -> MobileVLMError:
        return MobileVLMError(f"{path}: field '{field}' is missing or not {expected}")

    def figure(field: str, node: object) -> None:
        median = node.get("median") if isinstance(node, dict) else None
        if not isinstance(median, (int, float)) or isinstance(median, bool) or not math.isfinite(median):
            raise bad(f"{field}.median", "a finite number")

    if not isinstance(result.get("label"), str):
        raise bad("label", "a string")
    if not isinstance(result.get("environment"), dict):
        raise bad("environment", "an object")
    for field in ("decode_tok_s", "image_encode_ms", "ttft_ms"):
        if field in result:
            figure(field, result[field])
    prefill = result.get("prefill_tok_s", {})
    if not isinstance(prefill, dict):
        raise bad("prefill_tok_s", "an object of prompt length -> figure")
    for length, node in prefill.items():
        if not length.isdigit():
            raise bad(f"prefill_tok_s.{length}", "keyed by a prompt length")
        figure(f"prefill_tok_s.{length}", node)


def metrics(results: list[dict]) -> list[tuple[str, str, bool]]:
    """(column name, key path, higher is better) present in any result."""
    lengths = sorted({int(k) for r in results for k in r.get("prefill_tok_s", {})})
    columns = [("decode tok/s", "decode_tok_s", True)]
    columns += [(f"prefill@{n} tok/s", f"prefill_tok_s.{n}", True) for n in lengths]
    columns += [("image encode ms", "image_encode_ms", False), ("TTFT ms", "ttft_ms", False)]
    return columns


def value(result: dict, path: str) -> float | None:
    node = result
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node["median"]) if isinstance(node, dict) and "median" in node else None


def machine(env: dict) -> str:
    """Where a result was measured: this host's CPU and threads, or the RPC device's tracker key."""
    if env.get("rpc_key"):
        return f"RPC device '{env['rpc_key']}' via {env.get('rpc_tracker')}"
    return f"{env.get('cpu')} / {env.get('threads')} threads"


def table(results: list[dict], baseline: int = 0) -> str:
    if not 0 <= baseline < len(results):
        raise MobileVLMError(f"--baseline {baseline}: expected an index below {len(results)}")
    columns = metrics(results)
    base = results[baseline]
    header = f"{'result':<34}" + "".join(f"{name:>22}" for name, _, _ in columns)
    lines = [header, "-" * len(header)]
    for result in results:
        cells = []
        for _, path, higher in columns:
            mine, theirs = value(result, path), value(base, path)
            if mine is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = "" if theirs in (None, 0) else f" ({(mine / theirs if higher else theirs / mine):.2f}x)"
            cells.append(f"{mine:>12.1f}{ratio:>10}")
        lines.append(f"{result['label'][:33]:<34}" + "".join(cells))
    machines = {machine(r["environment"]) for r in results}
    lines.append(
        f"ratios against '{base['label']}' (speed-ups: >1 is faster); machines: {'; '.join(sorted(map(str, machines)))}"
    )
    return "\n".join(lines)


def chart(results: list[dict], output: Path, baseline: int = 0) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MobileVLMError("the chart needs matplotlib: pip install 'mobilevlm-mlc[bench]'") from None
    columns = metrics(results)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 4.2))
    labels = [r["label"] for r in results]
    for ax, (name, path, higher) in zip(axes, columns):
        values = [value(r, path) or 0.0 for r in results]
        bars = ax.bar(range(len(results)), values, color=[f"C{i}" for i in range(len(results))])
        base = value(results[baseline], path)
        for bar, v in zip(bars, values):
            if v and base:
                ax.annotate(
                    f"{(v / base if higher else base / v):.2f}x",
                    (bar.get_x() + bar.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_title(name + ("" if higher else " (lower is better)"), fontsize=9)
        ax.set_xticks(range(len(results)), labels, rotation=35, ha="right", fontsize=7)
    env = results[baseline]["environment"]
    fig.suptitle(
        f"MobileVLM benchmarks — {machine(env)} (ratios vs {results[baseline]['label']})",
        fontsize=10,
    )
    fig.tight_layout()
    from mobilevlm_mlc.fileio import atomic_file

    with atomic_file(Path(output), "png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
