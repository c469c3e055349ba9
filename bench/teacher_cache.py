"""fastkd.TeacherCache on this machine: bytes per token, write throughput (TopK entries in, shards on disk) and read
throughput (random samples through collate), k = 64, V = 32000 (uint16 indices) and 131072 (int32), bfloat16
log-probabilities; samples of 512 tokens, shards of 2^20 tokens. Medians of 3 runs; the page cache is warm on reads
(a second epoch), the figure a training loop sees after its first pass (:func:`fastkd.bench.teacher_cache_figures`;
``fastkd bench --op topk`` reports the same figures for its shapes, on fewer samples).

    python bench/teacher_cache.py [DIR]        (default: a temporary directory)
"""

import sys
import tempfile

from fastkd.bench import teacher_cache_figures


def main(root: str) -> None:
    print("k=64, 512 samples x 512 tokens, bfloat16 values; medians of 3 runs")
    print(f"{'V':>8} {'bytes/token':>12} {'write tok/s':>12} {'read tok/s':>12}")
    for vocab_size in (32000, 131072):
        figures = teacher_cache_figures(root, vocab_size, 64)
        print(
            f"{vocab_size:>8} {figures['bytes_per_token']:>12.1f} {figures['write_tokens_per_s']:>12.3g} "
            f"{figures['read_tokens_per_s']:>12.3g}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as root:
            main(root)
