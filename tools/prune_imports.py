"""Remove imports that pyflakes reports unused (a refactoring aid): python tools/prune_imports.py FILE..."""
import re
import subprocess
import sys

for path in sys.argv[1:]:
    out = subprocess.run([sys.executable, "-m", "pyflakes", path], capture_output=True, text=True).stdout
    unused = {}
    for line in out.splitlines():
        m = re.match(r".*?:(\d+):\d+:? '([^']+)' imported but unused", line)
        if m:
            unused.setdefault(int(m.group(1)), set()).add(m.group(2))
    lines = open(path).read().splitlines(keepends=True)
    for no, names in unused.items():
        line = lines[no - 1]
        m = re.match(r"(\s*)(from \S+ import |import )(.*)$", line.rstrip("\n"))
        if not m or "(" in line:
            print(f"{path}:{no}: left alone: {line.strip()}")
            continue
        parts = [p.strip() for p in m.group(3).split(",")]
        keep = [p for p in parts if p.split(" as ")[-1].strip() not in {n.split(".")[-1] for n in names} and p not in names]
        lines[no - 1] = (m.group(1) + m.group(2) + ", ".join(keep) + "\n") if keep else ""
    open(path, "w").write("".join(lines))
