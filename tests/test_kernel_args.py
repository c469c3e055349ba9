"""The one table of mode codes and statistics slots: fastkd/kernel_args.py, which the Triton kernels alias, and
the C++ enums of csrc/kd_args.h and csrc/feature_loss_cpu.h must agree name for name and value for value; and no
kernel source compares a mode or indexes a slot with a bare number."""

import os
import re

import pytest

from fastkd import kernel_args

CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")
KERNELS = os.path.join(os.path.dirname(__file__), "..", "kernels")

# (Python enum, header, C++ enum, the prefix of its enumerators after "k")
TABLE = [
    (kernel_args.DType, "kd_args.h", "DType", ""),
    (kernel_args.Divergence, "kd_args.h", "Divergence", ""),
    (kernel_args.Stat, "kd_args.h", "Stat", "Stat"),
    (kernel_args.TopKStat, "kd_args.h", "TopKStat", "TopK"),
    (kernel_args.Metric, "kd_args.h", "Metric", "Metric"),
    (kernel_args.FeatureKind, "feature_loss_cpu.h", "FeatureKind", "Kind"),
    (kernel_args.FeatureNormalize, "feature_loss_cpu.h", "FeatureNormalize", "Normalize"),
    (kernel_args.FeatureGroup, "feature_loss_cpu.h", "FeatureGroup", "Group"),
]


def cpp_enum(header: str, name: str) -> dict:
    """{enumerator: value} of ``enum name : int { ... }`` in csrc/header."""
    with open(os.path.join(CSRC, header), encoding="utf-8") as f:
        text = f.read()
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{(.*?)\};", text, re.S)
    assert body, f"no enum {name} in csrc/{header}"
    body = re.sub(r"//[^\n]*", "", body.group(1))
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}


@pytest.mark.parametrize("enum, header, name, prefix", TABLE, ids=[row[2] for row in TABLE])
def test_the_cpp_enums_are_the_python_table(enum, header, name, prefix):
    entries = cpp_enum(header, name)
    counts = {k: v for k, v in entries.items() if k.startswith("kNum")}
    named = {k[1 + len(prefix) :].lower(): v for k, v in entries.items() if k not in counts}
    assert named == {member.name.replace("_", "").lower(): int(member) for member in enum}
    for count in counts.values():
        assert count == len(enum)


def test_no_bare_mode_codes_or_slot_indices_in_the_kernels():
    """A mode constexpr compared with a number, or a statistics tensor indexed by a number times the row count, is
    the silent bug the named table prevents."""
    triton_pattern = re.compile(r"\b(DIVERGENCE|ENSEMBLE|KIND|NORMALIZE|GROUP)\s*[=!<>]=?\s*\d")
    cpp_pattern = re.compile(
        r"\b(divergence|kind|normalize|group)\s*[=!<>]=?\s*\d|stats\[\s*\d|\[\d+\s*\*\s*\w*num_rows"
    )
    found = []
    for folder, pattern, suffixes in ((KERNELS, triton_pattern, (".py",)), (CSRC, cpp_pattern, (".h", ".cpp", ".cu"))):
        for name in sorted(os.listdir(folder)):
            if name.endswith(suffixes):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not found, "\n".join(found)
