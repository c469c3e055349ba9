"""fastkd.TeacherCache on this machine: bytes per token, write throughput (TopK entries in, shards on disk) and read
throughput (random samples through collate), k = 64, V = 32000 (uint16 indices) and 131072 (int32), bfloat16
log-probabilities; samples of 512 tokens, shards of 2^20 tokens. Medians of 3 runs; the page cache is warm on reads
(a second epoch), the figure a training loop sees after its first pass.

    python bench/teacher_cache.py [DIR]        (default: a temporary directory)
"""

import shutil
import statistics
import sys
import tempfile
import time

import torch

from fastkd import TeacherCache, TopK

SAMPLES, LENGTH, K, BATCH = 512, 512, 64, 8


def entries(vocab_size: int, gen: torch.Generator) -> TopK:
    values = -torch.rand(BATCH, LENGTH, K, generator=gen) * 10 - 3  # log-probs well below log(1/K)
    indices = torch.randint(0, vocab_size, (BATCH, LENGTH, K), generator=gen)
    return TopK(values, indices)


def main(root: str) -> None:
    print(f"k={K}, {SAMPLES} samples x {LENGTH} tokens, bfloat16 values; medians of 3 runs")
    print(f"{'V':>8} {'bytes/token':>12} {'write tok/s':>12} {'read tok/s':>12}")
    gen = torch.Generator().manual_seed(0)
    for vocab_size in (32000, 131072):
        batches = [entries(vocab_size, gen) for _ in range(SAMPLES // BATCH)]
        writes, reads = [], []
        for run in range(3):
            path = f"{root}/v{vocab_size}-{run}"
            start = time.perf_counter()
            with TeacherCache.write(path, k=K, vocab_size=vocab_size) as writer:
                for b, top in enumerate(batches):
                    writer.add(range(b * BATCH, (b + 1) * BATCH), top)
            writes.append(SAMPLES * LENGTH / (time.perf_counter() - start))
            cache = TeacherCache(path)
            order = torch.randperm(SAMPLES, generator=gen).tolist()
            for _epoch in range(2):  # the first pass verifies the checksums and warms the page cache
                start = time.perf_counter()
                for i in range(0, SAMPLES, BATCH):
                    cache.collate(order[i : i + BATCH])
            reads.append(SAMPLES * LENGTH / (time.perf_counter() - start))
            shards = cache.index["shards"]
            payload = sum(s["bytes"][p] for s in shards for p in ("values", "indices", "counts", "samples"))
            shutil.rmtree(path)
        print(
            f"{vocab_size:>8} {payload / (SAMPLES * LENGTH):>12.1f} {statistics.median(writes):>12.3g} "
            f"{statistics.median(reads):>12.3g}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as root:
            main(root)
