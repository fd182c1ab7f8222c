"""Checks the shape rules of sd35_lora.py (issue 13): the reference first, the plumbing after a banner.

    python .ci/check_layout.py            # prints the numbers; exit 1 with the broken rules
    python .ci/check_layout.py --fix-map  # first rewrites the docstring's section line numbers

Rules: the plumbing banner starts at or before line 1500; the file has fewer than 2,100 lines; no function is
longer than 50 lines; at most 1 % of lines are longer than 110 characters; no compound statement keeps its body
on its own header line; every top-level function, class and method is used by sd35_lora.py or sample.py
(code that only tests or benchmarks use belongs in test_sd35.py or .ci/).
"""
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANNER = "Part 2: plumbing"
LIMITS = {"banner_line": 1500, "lines": 2099, "function_lines": 50, "long_line_chars": 110, "long_line_share": 0.01}


def measure(source: str, users: str) -> dict:
    lines = source.splitlines()
    tree = ast.parse(source)
    banner = next((i for i, line in enumerate(lines) if line.startswith("#") and BANNER in line), None)
    functions = {node.name if isinstance(parent, ast.Module) else f"{parent.name}.{node.name}":
                 node.end_lineno - node.lineno + 1
                 for parent in [tree, *(n for n in tree.body if isinstance(n, ast.ClassDef))]
                 for node in parent.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    one_liners = [node.lineno for node in ast.walk(tree)
                  if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.ClassDef))
                  and node.body and node.body[0].lineno == node.lineno]
    one_liners += [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                   if tok.type == tokenize.OP and tok.string == ";"]
    defined = {name.split(".")[-1] for name in functions}
    defined |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    dunder = {name for name in defined if name.startswith("__")}
    unused = sorted(name for name in defined - dunder
                    if len(re.findall(rf"\b{re.escape(name)}\b", source + users)) < 2)
    return {"lines": len(lines), "banner_line": banner, "part1_lines": (banner or len(lines)) - 1,
            "longest_function": max(functions.items(), key=lambda kv: kv[1]),
            "functions_over_limit": {k: v for k, v in functions.items() if v > LIMITS["function_lines"]},
            "long_lines": sum(len(line) > LIMITS["long_line_chars"] for line in lines),
            "one_liners": sorted(set(one_liners)), "unused_here": unused}


def fix_section_map(source: str) -> str:
    """The module docstring's rows `  <line>  <Section title>  ...` pointed at the `#####` line above each banner."""
    lines = source.splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if i > 0 and line.startswith('"""'))
    banners = {}
    for i, line in enumerate(lines):
        title = re.match(r"^#\s+(.+?)\s+#$", line.rstrip("\n"))
        if title and i > end and lines[i - 1].startswith("#####"):
            banners.setdefault(title.group(1), i)          # the 0-based index of the title = the ##### line's number
    for j in range(end):
        row = re.match(r"^\s+\d+  (\S.*)$", lines[j].rstrip("\n"))
        title = row and max((t for t in banners if row.group(1).startswith(t + " ")), key=len, default=None)
        if title:
            lines[j] = f"{banners[title]:>9}  {row.group(1)}\n"
    return "".join(lines)


def broken(m: dict) -> list[str]:
    problems = []
    if m["banner_line"] is None or m["banner_line"] > LIMITS["banner_line"]:
        problems.append(f"the '{BANNER}' banner is at line {m['banner_line']}, not <= {LIMITS['banner_line']}")
    if m["lines"] > LIMITS["lines"]:
        problems.append(f"{m['lines']} lines, more than {LIMITS['lines']}")
    if m["functions_over_limit"]:
        problems.append(f"functions over {LIMITS['function_lines']} lines: {m['functions_over_limit']}")
    if m["long_lines"] > LIMITS["long_line_share"] * m["lines"]:
        problems.append(f"{m['long_lines']} lines over {LIMITS['long_line_chars']} characters")
    if m["one_liners"]:
        problems.append(f"one-line compound statements at lines {m['one_liners']}")
    if m["unused_here"]:
        problems.append(f"defined but used only outside sd35_lora.py/sample.py: {m['unused_here']}")
    return problems


if __name__ == "__main__":
    if "--fix-map" in sys.argv:
        path = ROOT / "sd35_lora.py"
        path.write_text(fix_section_map(path.read_text()))
    m = measure((ROOT / "sd35_lora.py").read_text(), (ROOT / "sample.py").read_text())
    print({k: v for k, v in m.items() if k not in ("one_liners", "unused_here")})
    problems = broken(m)
    for p in problems:
        print("broken:", p)
    sys.exit(1 if problems else 0)
