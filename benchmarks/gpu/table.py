"""The GPU result JSON (benchmarks/gpu/speed.py) as the markdown table docs/benchmarks.md shows, and the
replacement of that table's block in the docs. Pure functions: tests/test_gpu_benchmark.py checks them."""

from __future__ import annotations

#: Issue 16's targets: name -> (bound, direction). Ratios are paired (timed back to back, median of the
#: per-repeat ratios): LEAD step time over the response-only step's; speeds (ours over theirs) otherwise.
TARGETS = {
    "lead_over_response_kd": (1.10, "<="),
    "ours_contrastive_speed_over_st": (1.0, ">="),
    "encode_over_st_best": (1.2, ">="),
}

BEGIN, END = "<!-- gpu-table:begin -->", "<!-- gpu-table:end -->"

_LABELS = {
    "lead_over_response_kd": "LEAD step / response-only step (time)",
    "ours_contrastive_speed_over_st": "student step, sentence-transformers / leadkd (time)",
    "encode_over_st_best": "encode, leadkd / best sentence-transformers batch size (speed)",
}


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_table(result: dict, compiled: dict | None = None) -> str:
    """Markdown: the targets, then every timed variant with its achieved TFLOP/s and share of the matmul
    rate, then (if that step ran) the compiled encode. A dry run says so in its first line, so it is never
    mistaken for a GPU measurement."""
    machine = result.get("machine", {})
    where = machine.get("gpu") or machine.get("device", "?")
    versions = result.get("versions", {})
    lines = []
    if result.get("dry_run"):
        lines.append("**Dry run (tiny shapes on the CPU): checks the script; these are not GPU figures.**\n")
    lines.append(f"Measured {result.get('date', '?')} on {where}; torch {versions.get('torch')}, transformers "
                 f"{versions.get('transformers')}, sentence-transformers {versions.get('sentence_transformers')}.")
    matmul = result.get("matmul")
    if matmul:
        lines.append(f"bf16 matmul {matmul['n']}³: **{matmul['tflops']:.1f} TFLOP/s** (the ceiling below).")
    tests = result.get("correctness")
    if tests:
        lines.append(f"`pytest -m gpu`: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped" + (f" ({', '.join(tests['failed_tests'])})"
                                                      if tests["failed_tests"] else "") + ".")
    lines += ["", "| target | measured | bound | met |", "|---|---:|---:|:---:|"]
    for name, row in result.get("targets", {}).items():
        met = {True: "yes", False: "**no**", None: "—"}[row["met"]]
        lines.append(f"| {_LABELS.get(name, name)} | {_fmt(row['value'])} | {row['target']} | {met} |")
    sections = [(result.get("encode"), "encode", "passages/s"), (result.get("train"), "train", "ms/step")]
    compiled_block = (compiled or {}).get("encode_compiled")
    if compiled_block:
        sections.append((compiled_block, "encode, compiled backbone (experimental)", "passages/s"))
    for block, section, unit in sections:
        if not block:
            continue
        lines += ["", f"| {section} variant | {unit} | TFLOP/s | of matmul | GPU busy |", "|---|---:|---:|---:|---:|"]
        for name, row in block["variants"].items():
            speed = row.get("passages_per_s", row.get("ms_per_step"))
            busy = row.get("gpu_busy_share")
            lines.append(f"| {name} | {_fmt(speed, 1)} | {_fmt(row['tflops'], 1)} | "
                         f"{_fmt(100 * row['fraction_of_matmul'], 1)}% | "
                         f"{'—' if busy is None else f'{100 * busy:.0f}%'} |")
    train = result.get("train") or {}
    if train.get("host_tokenize_ms_per_batch") is not None:
        lines += ["", (f"Tokenising one training batch on the host: {train['host_tokenize_ms_per_batch']:.1f} ms "
                       "(per model that tokenises; the joint steps tokenise twice).")]
    if compiled_block:
        ratios, block = compiled_block["ratios"], compiled_block
        lines += ["", (f"Compiled: {_fmt(ratios['compiled_over_st'])}x sentence-transformers' speed and "
                       f"{_fmt(ratios['compiled_over_plain'])}x leadkd's plain encode, after a first call of "
                       f"{block['first_call_s']:.0f} s that compiles (max abs difference to the plain vectors "
                       f"{block['max_abs_diff_compiled_vs_plain']:.1e}).")]
    return "\n".join(lines) + "\n"


def replace_block(document: str, table: str) -> str:
    """``document`` with the text between the gpu-table markers replaced by ``table``."""
    if BEGIN not in document or END not in document:
        raise ValueError(f"the document has no {BEGIN} ... {END} block to replace")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}{END}{tail}"
