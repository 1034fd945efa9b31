"""Print the requirements of pyproject.toml's extras, one per line (the one place they are
declared). Self-references such as danet_ops[build,train] are expanded; the project's own
dependencies come first.   python scripts/requirements.py build,test,train
Used by scripts/install.sh and scripts/build_cuda_ext.sh. Python >= 3.10 (3.10: pip's tomli)."""
import os
import re
import sys

try:
    import tomllib
except ImportError:                      # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements(names):
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    extras = project["optional-dependencies"]
    seen, out = set(), list(project.get("dependencies", []))

    def add(name):
        if name in seen:
            return
        if name not in extras:
            sys.exit(f"unknown extra {name!r}; pyproject.toml has {sorted(extras)}")
        seen.add(name)
        for req in extras[name]:
            m = re.fullmatch(r"danet_ops\[(.*)\]", req)
            if m:
                for sub in m.group(1).split(","):
                    add(sub.strip())
            else:
                out.append(req)

    for name in names:
        if name.strip():
            add(name.strip())
    return list(dict.fromkeys(out))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1].split(",") if len(sys.argv) > 1 else [])))
