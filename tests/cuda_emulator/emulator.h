// Runs the package's CUDA kernels on the CPU for the tests on machines without a GPU.
//
// Each block of a launch runs as blockDim OS threads (blocks one after another), so every thread of the CUDA
// source executes: __syncthreads is a barrier over the block, __shfl_down_sync an exchange over the warp
// (32 consecutive threads), __shared__ arrays are shared by the block's threads, and a thread that returns
// early drops out of later barriers as it does on the device. Only what the kernels of this package use is
// provided; a kernel using something else fails to compile here, which is the point.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

using std::max;
using std::min;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one copy per kernel function, shared by the block's threads (blocks run one at a time)
#define __shared__ static

namespace gia_emu {

struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<unsigned long long> lanes;  // one 8-byte exchange slot per thread
};
inline Block* block = nullptr;
inline thread_local unsigned tid = 0;  // linear thread index in the block

inline void arrive_and_drop() {
    block->all->arrive_and_drop();
    block->warps[tid / 32]->arrive_and_drop();
}

inline void reset(Block& b, unsigned n) {
    b.all = std::make_unique<std::barrier<>>(n);
    b.warps.clear();
    for (unsigned w0 = 0; w0 < n; w0 += 32)
        b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w0)));
    b.lanes.assign(n, 0);
}

// Runs kernel() for every thread of every block of the launch: one OS thread per CUDA thread of a block,
// created once per launch; the blocks run one after another (a gate before and after each).
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& kernel) {
    const unsigned n = threads.x * threads.y * threads.z;
    if (n == 0 || n > 1024) throw std::invalid_argument("block size must be 1..1024 threads");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        throw std::invalid_argument("grid dimension out of CUDA's range");
    gridDim = grid;
    blockDim = threads;
    std::vector<dim3> blocks;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) blocks.emplace_back(bx, by, bz);
    Block b;
    block = &b;
    std::barrier<> gate(n + 1);
    std::vector<std::thread> pool;
    pool.reserve(n);
    for (unsigned t = 0; t < n; ++t)
        pool.emplace_back([&, t] {
            tid = t;
            threadIdx = dim3(t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y));
            for (const dim3& bi : blocks) {
                gate.arrive_and_wait();  // the block's barriers are ready
                blockIdx = bi;
                kernel();
                arrive_and_drop();  // a finished thread no longer holds up the others' barriers
                gate.arrive_and_wait();  // every thread of the block is done
            }
        });
    for (std::size_t k = 0; k < blocks.size(); ++k) {
        reset(b, n);
        gate.arrive_and_wait();
        gate.arrive_and_wait();
    }
    for (auto& th : pool) th.join();
    block = nullptr;
}

}  // namespace gia_emu

inline double __longlong_as_double(long long bits) {
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

inline void __syncthreads() { gia_emu::block->all->arrive_and_wait(); }

// Value of the lane `offset` above this one in the warp (own value past the warp's end), as on the device.
// All 32 lanes must take part (mask 0xffffffff), as in every use in this package.
template <class T>
inline T __shfl_down_sync(unsigned mask, T value, int offset) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    if (mask != 0xffffffffu) throw std::invalid_argument("emulated __shfl_down_sync needs the full warp mask");
    using namespace gia_emu;
    auto& bar = *block->warps[tid / 32];
    std::memcpy(&block->lanes[tid], &value, sizeof(T));
    bar.arrive_and_wait();
    const unsigned lane = tid % 32, width = std::min(32u, blockDim.x * blockDim.y * blockDim.z - (tid - lane));
    T out = value;
    if (lane + offset < width) std::memcpy(&out, &block->lanes[tid + offset], sizeof(T));
    bar.arrive_and_wait();
    return out;
}
