#include "buffer_pool.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastkd {
namespace buffer_pool {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

struct Pool {
    std::mutex mutex;
    std::multimap<size_t, void*> free_blocks;     // by size
    std::unordered_map<void*, size_t> block_size;  // every live or cached block
    size_t cached = 0;
    size_t limit = size_t(1) << 30;
};

Pool& pool() {
    static Pool* p = new Pool;  // never destroyed: blocks may be released during interpreter shutdown
    return *p;
}

size_t rounded(size_t nbytes) {
    const size_t unit = nbytes >= kHugePage ? kHugePage : 64;
    return (nbytes + unit - 1) / unit * unit;
}

void trim(Pool& p, size_t keep) {  // frees the largest cached blocks until at most `keep` bytes stay
    while (p.cached > keep && !p.free_blocks.empty()) {
        auto it = std::prev(p.free_blocks.end());
        p.cached -= it->first;
        p.block_size.erase(it->second);
        std::free(it->second);
        p.free_blocks.erase(it);
    }
}

}  // namespace

void* allocate(size_t nbytes) {
    const size_t size = rounded(nbytes == 0 ? 1 : nbytes);
    Pool& p = pool();
    {
        std::lock_guard<std::mutex> lock(p.mutex);
        auto it = p.free_blocks.find(size);
        if (it != p.free_blocks.end()) {
            void* block = it->second;
            p.cached -= size;
            p.free_blocks.erase(it);
            return block;
        }
    }
    void* block = nullptr;
    if (posix_memalign(&block, size >= kHugePage ? kHugePage : 64, size) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (size >= kHugePage) madvise(block, size, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    std::lock_guard<std::mutex> lock(p.mutex);
    p.block_size[block] = size;
    return block;
}

void release(void* block) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    const size_t size = p.block_size.at(block);
    if (size > p.limit) {
        p.block_size.erase(block);
        std::free(block);
        return;
    }
    p.free_blocks.emplace(size, block);
    p.cached += size;
    trim(p, p.limit);
}

void empty() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    trim(p, 0);
}

size_t cached_bytes() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    return p.cached;
}

size_t limit() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    return p.limit;
}

void set_limit(size_t nbytes) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    p.limit = nbytes;
    trim(p, nbytes);
}

}  // namespace buffer_pool
}  // namespace fastkd
