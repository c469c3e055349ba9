// A cache of large, page-aligned output buffers for the CPU kernels.
//
// A fresh multi-megabyte allocation comes from mmap, and the kernel zero-fills each page on first touch: for a
// 262 MB gradient that costs more than the kernel that writes it (bench/RESULTS.md). Blocks released here are
// kept (up to a byte limit) and handed out again, so a training loop that asks for the same gradient shape every
// step touches its pages once. Blocks of 2 MiB and more are aligned to 2 MiB and advised as huge pages on Linux.
#pragma once
#include <cstddef>

namespace fastkd {
namespace buffer_pool {

void* allocate(size_t nbytes);    // 64-byte aligned (2 MiB aligned from 2 MiB up); throws std::bad_alloc
void release(void* block);        // a block from allocate
void empty();                     // frees every cached block
size_t cached_bytes();            // bytes held in free blocks
size_t limit();                   // the most bytes kept in free blocks
void set_limit(size_t nbytes);    // also frees cached blocks beyond it

}  // namespace buffer_pool
}  // namespace fastkd
