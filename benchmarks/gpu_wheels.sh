#!/usr/bin/env bash
# Fill benchmarks/gpu_wheels/ (git-ignored) with exactly what a GPU machine lacks to run
# benchmarks/gpu_check.sh: wheels for its Python, plus the fairseq-fixed sdist it builds there.
# Run on a machine with a package index; INVENTORY is the machine's `gpu_check.sh --inventory`
# output (first line "python X.Y.Z ARCH", then `pip list --format=freeze`).
#
#   bash benchmarks/gpu_wheels.sh gpu_inventory.txt
#
# What it downloads: btm's runtime needs without torch (setup.py's core and fairseq lists, the
# test runner, fairseq's build tools), resolved for that Python and platform with every package
# the machine already has pinned to its installed version, minus those installed packages.
# The folder travels with the working tree to the device machine, whose whole tree is limited to
# 64 MiB, hence a warning above 48 MiB. A machine without torch is refused: torch is GBs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
inventory="${1:?usage: $0 INVENTORY (the output of gpu_check.sh --inventory)}"
dest="$repo/benchmarks/gpu_wheels"
py="${BTM_PYTHON:-python3}"
# sha256 of the fairseq-fixed 0.12.3.1 sdist, as pinned in scripts/setup_env.sh.
fairseq_spec="fairseq-fixed==0.12.3.1"
fairseq_sha256="c607577a54ab30e2ee0f0b0a754ea5cdbc6ad0a9f99a1726638a2201445bc1cc"

read -r _ version arch < <(head -n1 "$inventory")
pyver="${version%.*}"  # 3.12.4 -> 3.12
abi="cp${pyver/./}"
[ "$arch" = x86_64 ] || { echo "only x86_64 GPU machines are handled (got $arch)" >&2; exit 2; }
grep -qiE '^torch==' "$inventory" || { echo "$inventory has no torch: bring a machine with torch" >&2; exit 2; }
platform=(--python-version "$pyver" --implementation cp --abi "$abi" --only-binary=:all:
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform linux_x86_64 --platform any)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -E '^[A-Za-z0-9._-]+==[^ ]+$' "$inventory" >"$tmp/installed.txt"
# Everything btm needs on the GPU machine except torch (setup.py: core + fairseq; the tests).
"$py" - "$repo/setup.py" >"$tmp/wanted.txt" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
lists = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
         for t in node.targets if isinstance(t, ast.Name) and t.id in ("core", "fairseq", "test")}
for req in lists["core"] + lists["fairseq"] + lists["test"]:
    if not req.startswith("torch"):
        print(req)
print("setuptools<81\nwheel")  # fairseq-fixed's build (--no-build-isolation)
EOF

echo "resolving for Python $pyver ($abi) against $(wc -l <"$tmp/installed.txt") installed packages"
"$py" -m pip install --disable-pip-version-check -q --dry-run --ignore-installed --target "$tmp/target" \
  "${platform[@]}" -c "$tmp/installed.txt" -r "$tmp/wanted.txt" --report "$tmp/report.json"
"$py" - "$tmp/report.json" "$tmp/installed.txt" >"$tmp/missing.txt" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
installed = {norm(line.split("==")[0]): line.split("==")[1].strip() for line in open(sys.argv[2])}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if installed.get(norm(name)) != version:
        print(f"{name}=={version}")
EOF
echo "missing on the GPU machine:"; sed 's/^/  /' "$tmp/missing.txt"

mkdir -p "$dest"
if [ -s "$tmp/missing.txt" ]; then
  "$py" -m pip download --disable-pip-version-check -q --no-deps "${platform[@]}" -d "$dest" -r "$tmp/missing.txt"
fi
"$py" -m pip download --disable-pip-version-check -q --no-deps --no-binary=:all: --no-build-isolation \
  -d "$dest" "$fairseq_spec"
sdist="$(ls "$dest"/fairseq[-_]fixed-0.12.3.1.tar.gz)"
echo "$fairseq_sha256  $sdist" | sha256sum -c - >/dev/null || { echo "$sdist: sha256 mismatch" >&2; rm -f "$sdist"; exit 1; }

size_mib=$(( $(du -sk "$dest" | cut -f1) / 1024 ))
echo "$dest: $(ls "$dest" | wc -l) files, ${size_mib} MiB"
[ "$size_mib" -le 48 ] || echo "warning: over 48 MiB; with the repository it may exceed the 64 MiB the device machine takes" >&2
